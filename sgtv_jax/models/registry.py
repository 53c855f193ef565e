"""Architecture registry: HF ``model_type`` -> (config class, Flax NNX model class)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from . import bert, gpt2, llama

_FAMILIES: dict[str, Any] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
    "gpt2": gpt2,
    "bert": bert,
}
_MODEL_CLASSES: dict[str, type[nnx.Module]] = {
    "llama": llama.LlamaForCausalLM,
    "mistral": llama.LlamaForCausalLM,
    "qwen2": llama.LlamaForCausalLM,
    "gpt2": gpt2.GPT2LMHeadModel,
    "bert": bert.BertModel,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_MODEL_CLASSES)


def _check(model_type: str) -> None:
    if model_type not in _MODEL_CLASSES:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def get_model_class(model_type: str) -> type[nnx.Module]:
    """Flax NNX model class for an HF ``model_type`` (ValueError listing supported ones)."""
    _check(model_type)
    return _MODEL_CLASSES[model_type]


def get_family(model_type: str) -> Any:
    """Family module (``llama``/``gpt2``/``bert``): ``hf_block_prefix``, ``LINEAR_NAMES``, ..."""
    _check(model_type)
    return _FAMILIES[model_type]


def config_from_hf(hf_config: Any, param_dtype: Any = jnp.float32) -> Any:
    """Our frozen config dataclass for a transformers config (or pass ours through)."""
    mt = getattr(hf_config, "model_type", None)
    cls = get_model_class(mt).config_class
    if isinstance(hf_config, cls):  # already ours
        return hf_config
    return cls.from_hf(hf_config, param_dtype=param_dtype)


def build_model(hf_config: Any, rngs: nnx.Rngs | None = None, param_dtype: Any = jnp.float32) -> nnx.Module:
    """Randomly initialised model for ``hf_config`` (transformers config or our dataclass)."""
    cfg = config_from_hf(hf_config, param_dtype)
    return get_model_class(cfg.model_type)(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))


def build_abstract_model(hf_config: Any, param_dtype: Any = jnp.float32) -> nnx.Module:
    """Model whose parameters are ``jax.ShapeDtypeStruct`` (no memory, no init compute).

    Fill it with ``convert.namemaps.load_hf_state_dict_into_model`` (which
    returns the concrete model).
    """
    cfg = config_from_hf(hf_config, param_dtype)
    cls = get_model_class(cfg.model_type)
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
