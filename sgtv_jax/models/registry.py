"""Flax side of the architecture registry: HF ``model_type`` -> family module and model class.

Each family module declares the ``model_type`` values it implements
(``MODEL_TYPES``) and its model (``MODEL_CLASS``); this module only indexes
them. Name maps, GGUF names and the rest live in ``convert.architectures``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import jax.numpy as jnp
from flax import nnx

from . import bert, gemma, gpt2, llama
from .common import FamilyModel

_FAMILIES: dict[str, ModuleType] = {mt: fam for fam in (llama, gemma, gpt2, bert) for mt in fam.MODEL_TYPES}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


def get_family(model_type: str | None) -> ModuleType:
    """Family module (``llama``/``gemma``/``gpt2``/``bert``): config class, ``hf_block_prefix``, ``MODEL_CLASS``."""
    if model_type not in _FAMILIES:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return _FAMILIES[model_type]


def get_model_class(model_type: str | None) -> type[FamilyModel]:
    """Flax NNX model class for an HF ``model_type`` (ValueError listing supported ones)."""
    return get_family(model_type).MODEL_CLASS


def config_from_hf(hf_config: Any, param_dtype: Any = jnp.float32) -> Any:
    """Our frozen config dataclass for a transformers config (or pass ours through)."""
    mt = getattr(hf_config, "model_type", None)
    cls = get_model_class(mt).config_class
    if isinstance(hf_config, cls):  # already ours
        return hf_config
    return cls.from_hf(hf_config, param_dtype=param_dtype)


def build_model(hf_config: Any, rngs: nnx.Rngs | None = None, param_dtype: Any = jnp.float32) -> FamilyModel:
    """Randomly initialised model for ``hf_config`` (transformers config or our dataclass)."""
    cfg = config_from_hf(hf_config, param_dtype)
    return get_model_class(cfg.model_type)(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))


def build_abstract_model(hf_config: Any, param_dtype: Any = jnp.float32) -> FamilyModel:
    """Model whose parameters are ``jax.ShapeDtypeStruct`` (no memory, no init compute).

    Fill it with ``convert.namemaps.load_hf_state_dict_into_model`` (which
    returns the concrete model).
    """
    cfg = config_from_hf(hf_config, param_dtype)
    cls = get_model_class(cfg.model_type)
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
