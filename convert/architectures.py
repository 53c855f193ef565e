"""The architecture registry: everything that depends on a checkpoint's ``model_type``, in one table.

One row per Hugging Face ``model_type`` we can load into Flax:

| field | what it is for |
| --- | --- |
| ``family`` | the Flax NNX module (``sgtv_jax.models.llama`` ...): config, model class, ``hf_block_prefix`` |
| ``name_map`` | HF tensor names <-> Flax state paths (``convert.namemaps``) |
| ``hf_class`` | the ``architectures`` entry written into ``config.json`` |
| ``gguf`` | llama.cpp's ``general.architecture`` for it, or None when GGUF is not read |
| ``gguf_permuted_qk`` | whether llama.cpp stores q/k rows permuted for interleaved RoPE |
| ``gguf_block`` | llama.cpp's per-block tensor names -> HF names under ``model.layers.{i}.`` |
| ``gguf_norm_plus_one`` | whether llama.cpp stores RMSNorm weights as ``1 + w`` (gemma's ``(1 + w)`` norm) |
| ``gguf_moe`` | the row llama.cpp's ``gguf`` architecture means when the file has expert tensors |

Adding an architecture means adding its Flax module, its name map and one row
here; readers, converters and the merge pipeline look it up by ``model_type``.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    gguf_block: Mapping[str, str] = {}
    gguf_norm_plus_one: bool = False
    gguf_moe: bool = False

    @property
    def model_class(self) -> type:
        """The Flax NNX model class (declared by the family module)."""
        return self.family.MODEL_CLASS


# llama.cpp's block tensor names (``blk.{i}.<name>.weight|bias``) -> HF names under
# ``model.layers.{i}.``. ``{e}`` marks a tensor llama.cpp stacks over experts as
# ``[E, ...]``: it stands for E HF tensors, one per expert.
_GGUF_ATTENTION = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3, qwen3moe, gemma3
    "attn_k_norm": "self_attn.k_norm",
}
_GGUF_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GGUF_LLAMA = {**_GGUF_ATTENTION, "ffn_norm": "post_attention_layernorm", **_GGUF_MLP}
# Gemma's four norms per block: llama.cpp's ffn_norm is the pre-feed-forward one.
GGUF_GEMMA = {
    **_GGUF_ATTENTION,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    **_GGUF_MLP,
}
# phi3 keeps HF's fused projections; llama.cpp's ffn_up holds gate_up_proj ([gate; up] rows).
GGUF_PHI3 = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_QWEN_MOE = {
    **_GGUF_ATTENTION,
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",  # qwen2moe
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
GGUF_MIXTRAL = {
    **_GGUF_ATTENTION,
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
}

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            "llama",
            llama,
            llama_map.NAME_MAP,
            "LlamaForCausalLM",
            gguf="llama",
            gguf_permuted_qk=True,
            gguf_block=GGUF_LLAMA,
        ),
        Architecture(
            "mistral",
            llama,
            llama_map.NAME_MAP,
            "MistralForCausalLM",
            gguf="mistral",
            gguf_permuted_qk=True,
            gguf_block=GGUF_LLAMA,
        ),
        Architecture("qwen2", llama, llama_map.NAME_MAP, "Qwen2ForCausalLM", gguf="qwen2", gguf_block=GGUF_LLAMA),
        Architecture("qwen3", llama, llama_map.NAME_MAP, "Qwen3ForCausalLM", gguf="qwen3", gguf_block=GGUF_LLAMA),
        Architecture("phi3", llama, llama_map.NAME_MAP, "Phi3ForCausalLM", gguf="phi3", gguf_block=GGUF_PHI3),
        # llama.cpp writes Mixtral as "llama" with stacked expert tensors.
        Architecture(
            "mixtral",
            llama,
            llama_map.NAME_MAP,
            "MixtralForCausalLM",
            gguf="llama",
            gguf_permuted_qk=True,
            gguf_block=GGUF_MIXTRAL,
            gguf_moe=True,
        ),
        Architecture(
            "qwen2_moe", llama, llama_map.NAME_MAP, "Qwen2MoeForCausalLM", gguf="qwen2moe", gguf_block=GGUF_QWEN_MOE
        ),
        Architecture(
            "qwen3_moe", llama, llama_map.NAME_MAP, "Qwen3MoeForCausalLM", gguf="qwen3moe", gguf_block=GGUF_QWEN_MOE
        ),
        Architecture(
            "gemma2",
            gemma,
            gemma_map.NAME_MAP,
            "Gemma2ForCausalLM",
            gguf="gemma2",
            gguf_block=GGUF_GEMMA,
            gguf_norm_plus_one=True,
        ),
        Architecture(
            "gemma3_text",
            gemma,
            gemma_map.NAME_MAP,
            "Gemma3ForCausalLM",
            gguf="gemma3",
            gguf_block=GGUF_GEMMA,
            gguf_norm_plus_one=True,
        ),
        Architecture("gpt2", gpt2, gpt2_map.NAME_MAP, "GPT2LMHeadModel"),
        Architecture("bert", bert, bert_map.NAME_MAP, "BertModel"),
    )
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)
# llama.cpp's general.architecture -> our row; GGUF_MOE_VARIANTS: the row instead when the file has expert tensors.
GGUF_ARCHITECTURES: dict[str, Architecture] = {a.gguf: a for a in ARCHITECTURES.values() if a.gguf and not a.gguf_moe}
GGUF_MOE_VARIANTS: dict[str, Architecture] = {a.gguf: a for a in ARCHITECTURES.values() if a.gguf and a.gguf_moe}


def get_architecture(model_type: str) -> Architecture:
    """The registry row for ``model_type``; ConvertError listing the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except (KeyError, TypeError):
        raise ConvertError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None
