"""HF <-> Flax name map for the LLaMA family (llama, mistral, qwen2, qwen3, phi3, mixtral, qwen2/3_moe, SmolLM).

HF names (``LlamaForCausalLM``) and Flax paths (``sgtv_jax.models.llama``)::

    model.embed_tokens.weight [V, D]            <-> ("embed_tokens", "embedding")       as is
    model.layers.{i}.self_attn.q_proj.weight     <-> ("blocks", i, "self_attn", "q_proj", "kernel")  transposed
    model.layers.{i}.self_attn.q_proj.bias       <-> (..., "q_proj", "bias")   (qwen2 / attention_bias)
    model.layers.{i}.self_attn.q_norm.weight     <-> (..., "q_norm", "scale")  [Dh]  (qwen3; k_norm too)
    model.layers.{i}.self_attn.qkv_proj.weight   <-> (..., "qkv_proj", "kernel")  (phi3; mlp.gate_up_proj too)
    model.layers.{i}.block_sparse_moe.gate.weight [E, D]      <-> (..., "block_sparse_moe", "gate", "kernel")  (mixtral)
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight   <-> (..., "experts", e, "w1", "kernel")  (w2, w3 alike)
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight         <-> (..., "mlp", "experts", e, "gate_proj", "kernel")  (qwen MoE)
    model.layers.{i}.mlp.shared_expert.*, mlp.shared_expert_gate.weight [1, D]                      (qwen2_moe)
    model.layers.{i}.input_layernorm.weight      <-> ("blocks", i, "input_layernorm", "scale")
    model.norm.weight                            <-> ("norm", "scale")
    lm_head.weight [V, D]                        <-> ("lm_head", "kernel") transposed; absent when tied

MoE experts use the per-expert names ``save_pretrained`` writes (transformers
v5 fuses them into 3-D ``experts.gate_up_proj`` only in memory).

HF q/k rows are already in split-half RoPE order (GGUF's interleaved order is
the reader's business), so only transposes happen here. Ignored (not
parameters): ``*.rotary_emb.inv_freq`` buffers and ``lm_head.weight`` of a
tied checkpoint.

Interface (``config``: a transformers config or ``sgtv_jax.models.llama.LlamaConfig``):
``hf_to_flax(name, array, config) -> (flax_path, array) | None``,
``flax_to_hf(flax_path, array, config) -> (name, array)``,
``expected_hf_tensors(config) -> {name: shape}``,
``check_hf_tensor(name, shape, config)``, ``is_ignored(name, config)``.
"""

from __future__ import annotations

from typing import Any

from sgtv_jax.models.llama import LlamaConfig, hf_block_prefix
from sgtv_jax.models.moe import EXPERT_NAMES, MOE_PREFIX

from ._base import NameMap, Rule, block_rules, module_getattr


def _config(config: Any) -> LlamaConfig:
    return config if isinstance(config, LlamaConfig) else LlamaConfig.from_hf(config)


def _rules(cfg: LlamaConfig) -> list[Rule]:
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    rules = [Rule("model.embed_tokens.weight", ("embed_tokens", "embedding"), False, (v, d))]
    for i in range(cfg.num_hidden_layers):
        e: list[tuple[str, str, bool, tuple[int, ...]]]
        if cfg.fused:
            if cfg.qkv_bias or cfg.mlp_bias:
                raise ValueError("fused qkv_proj / gate_up_proj with biases is not supported")
            e = [
                ("self_attn.qkv_proj.weight", "kernel", True, (q + 2 * kv, d)),
                ("self_attn.o_proj.weight", "kernel", True, (d, q)),
                ("mlp.gate_up_proj.weight", "kernel", True, (2 * f, d)),
                ("mlp.down_proj.weight", "kernel", True, (d, f)),
            ]
        else:
            e = [
                ("self_attn.q_proj.weight", "kernel", True, (q, d)),
                ("self_attn.k_proj.weight", "kernel", True, (kv, d)),
                ("self_attn.v_proj.weight", "kernel", True, (kv, d)),
                ("self_attn.o_proj.weight", "kernel", True, (d, q)),
            ]
            if cfg.moe is None:
                e += [
                    ("mlp.gate_proj.weight", "kernel", True, (f, d)),
                    ("mlp.up_proj.weight", "kernel", True, (f, d)),
                    ("mlp.down_proj.weight", "kernel", True, (d, f)),
                ]
        e += [
            ("input_layernorm.weight", "scale", False, (d,)),
            ("post_attention_layernorm.weight", "scale", False, (d,)),
        ]
        if cfg.qk_norm:
            e += [
                ("self_attn.q_norm.weight", "scale", False, (cfg.head_dim,)),
                ("self_attn.k_norm.weight", "scale", False, (cfg.head_dim,)),
            ]
        if cfg.qkv_bias:
            e += [
                ("self_attn.q_proj.bias", "bias", False, (q,)),
                ("self_attn.k_proj.bias", "bias", False, (kv,)),
                ("self_attn.v_proj.bias", "bias", False, (kv,)),
            ]
        if cfg.o_bias:
            e.append(("self_attn.o_proj.bias", "bias", False, (d,)))
        if cfg.mlp_bias:
            e += [
                ("mlp.gate_proj.bias", "bias", False, (f,)),
                ("mlp.up_proj.bias", "bias", False, (f,)),
                ("mlp.down_proj.bias", "bias", False, (d,)),
            ]
        rules += block_rules(hf_block_prefix(i), ("blocks", i), e)
        if cfg.moe is not None:
            rules += _moe_rules(cfg, i)
    rules.append(Rule("model.norm.weight", ("norm", "scale"), False, (d,)))
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), True, (v, d)))
    return rules


def _moe_rules(cfg: LlamaConfig, i: int) -> list[Rule]:
    """Router, per-expert and shared-expert tensors of block ``i`` (expert index is an int path element)."""
    d, fe, fs, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.num_experts
    assert cfg.moe is not None, "expert tensors exist only in MoE configs"  # the caller checks
    p = MOE_PREFIX[cfg.moe]
    hf, fx = f"{hf_block_prefix(i)}{p}.", ("blocks", i, p)
    rules = [Rule(hf + "gate.weight", fx + ("gate", "kernel"), True, (n, d))]
    g, u, dn = EXPERT_NAMES[cfg.moe]
    for e in range(n):
        for name, shape in ((g, (fe, d)), (u, (fe, d)), (dn, (d, fe))):
            rules.append(Rule(f"{hf}experts.{e}.{name}.weight", fx + ("experts", e, name, "kernel"), True, shape))
    if fs:
        for name, shape in (("gate_proj", (fs, d)), ("up_proj", (fs, d)), ("down_proj", (d, fs))):
            rules.append(Rule(f"{hf}shared_expert.{name}.weight", fx + ("shared_expert", name, "kernel"), True, shape))
        rules.append(Rule(hf + "shared_expert_gate.weight", fx + ("shared_expert_gate", "kernel"), True, (1, d)))
    return rules


NAME_MAP = NameMap(
    family="llama",
    rules_fn=_rules,
    normalize_fn=lambda name: name,
    # lm_head.weight only matches here when the config ties it (then it is a copy of the embedding).
    ignore_patterns=[r"\.rotary_emb\.inv_freq$", r"^lm_head\.weight$"],
    config_fn=_config,
)

__getattr__ = module_getattr(NAME_MAP, __name__)  # hf_to_flax, flax_to_hf, ... of NAME_MAP
