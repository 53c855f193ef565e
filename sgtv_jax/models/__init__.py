"""Flax NNX model definitions (one module per family) and the architecture registry.

Families: ``llama`` (llama, mistral, qwen2, qwen3, phi3, mixtral, qwen2_moe,
qwen3_moe, SmolLM), ``gemma`` (gemma2, gemma3_text), ``gpt2``, ``bert``.
Every model exposes its forward pass in pieces for block-by-block pipelines:

* ``model.embed(input_ids, ...) -> x [B, S, D]``
* ``model.block_kwargs(attention_mask, seq_len, batch=None) -> dict`` of what
  every block takes besides ``x`` (mask ``[B,1,S,S]``; positions for llama)
* ``model.blocks`` (``nnx.List``); ``block(x, capture=False, **kw)`` returns ``y``
  or ``(y, captures)`` with ``captures[hf_local_linear_name] = input [B, S, in]``
* ``model.head(x)`` -> logits ``[B, S, V]`` (BERT: hidden state, identity)
* ``model(input_ids, attention_mask=None)``
* ``model.hf_block_prefix(i)`` / ``model.linear_names``

Blocks of one model share their parameter structure but not always their
graphdef: a gemma block's layer type (sliding / full attention) is static, so
take each block's own graphdef from ``split_block(model, i)``; ``apply_block``
compiles once per distinct graphdef. MoE blocks capture the experts' shared
input once plus routing weights (``sgtv_jax.models.moe``: capture format and
``linear_input(caps, name) -> (input, token_weights)``).

Functional helpers (one compilation for all blocks of a model):
``apply_block(graphdef, state, x, capture=False, **kw)``, ``split_block``,
``get_block_state``, ``set_block_state``, ``forward_blockwise(model, ids, mask)``.

Registry: ``get_model_class(model_type)``, ``build_model(hf_config, rngs)``
(random init), ``build_abstract_model(hf_config)`` (shapes only, to be filled
by ``convert.namemaps.load_hf_state_dict_into_model``), ``config_from_hf``.
"""

from .common import apply_block, forward_blockwise, get_block_state, set_block_state, split_block
from .registry import (
    SUPPORTED_MODEL_TYPES,
    build_abstract_model,
    build_model,
    config_from_hf,
    get_family,
    get_model_class,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "apply_block",
    "build_abstract_model",
    "build_model",
    "config_from_hf",
    "forward_blockwise",
    "get_block_state",
    "get_family",
    "get_model_class",
    "set_block_state",
    "split_block",
]
