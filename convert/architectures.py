"""The architecture registry: everything that depends on a checkpoint's ``model_type``, in one table.

One row per Hugging Face ``model_type`` we can load into Flax:

| field | what it is for |
| --- | --- |
| ``family`` | the Flax NNX module (``sgtv_jax.models.llama`` ...): config, model class, ``hf_block_prefix`` |
| ``name_map`` | HF tensor names <-> Flax state paths (``convert.namemaps``) |
| ``hf_class`` | the ``architectures`` entry written into ``config.json`` |
| ``gguf`` | llama.cpp's ``general.architecture`` for it, or None when GGUF is not read |
| ``gguf_permuted_qk`` | whether llama.cpp stores q/k rows permuted for interleaved RoPE |

Adding an architecture means adding its Flax module, its name map and one row
here; readers, converters and the merge pipeline look it up by ``model_type``.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

from convert.errors import ConvertError
from convert.namemaps import bert as bert_map
from convert.namemaps import gemma as gemma_map
from convert.namemaps import gpt2 as gpt2_map
from convert.namemaps import llama as llama_map
from convert.namemaps._base import NameMap
from sgtv_jax.models import bert, gemma, gpt2, llama


class Architecture(NamedTuple):
    """How one HF ``model_type`` maps onto our Flax models, name maps and GGUF files."""

    model_type: str
    family: ModuleType
    name_map: NameMap
    hf_class: str
    gguf: str | None = None
    gguf_permuted_qk: bool = False

    @property
    def model_class(self) -> type:
        """The Flax NNX model class (declared by the family module)."""
        return self.family.MODEL_CLASS


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", llama, llama_map.NAME_MAP, "LlamaForCausalLM", gguf="llama", gguf_permuted_qk=True),
        Architecture("mistral", llama, llama_map.NAME_MAP, "MistralForCausalLM", gguf="mistral", gguf_permuted_qk=True),
        Architecture("qwen2", llama, llama_map.NAME_MAP, "Qwen2ForCausalLM", gguf="qwen2"),
        Architecture("qwen3", llama, llama_map.NAME_MAP, "Qwen3ForCausalLM", gguf="qwen3"),
        Architecture("phi3", llama, llama_map.NAME_MAP, "Phi3ForCausalLM"),
        Architecture("mixtral", llama, llama_map.NAME_MAP, "MixtralForCausalLM"),
        Architecture("qwen2_moe", llama, llama_map.NAME_MAP, "Qwen2MoeForCausalLM"),
        Architecture("qwen3_moe", llama, llama_map.NAME_MAP, "Qwen3MoeForCausalLM"),
        Architecture("gemma2", gemma, gemma_map.NAME_MAP, "Gemma2ForCausalLM"),
        Architecture("gemma3_text", gemma, gemma_map.NAME_MAP, "Gemma3ForCausalLM"),
        Architecture("gpt2", gpt2, gpt2_map.NAME_MAP, "GPT2LMHeadModel"),
        Architecture("bert", bert, bert_map.NAME_MAP, "BertModel"),
    )
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)
GGUF_ARCHITECTURES: dict[str, Architecture] = {a.gguf: a for a in ARCHITECTURES.values() if a.gguf}


def get_architecture(model_type: str) -> Architecture:
    """The registry row for ``model_type``; ConvertError listing the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except (KeyError, TypeError):
        raise ConvertError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None
