"""HF <-> Flax name map for Gemma 2 and Gemma 3 text models (``gemma2``, ``gemma3_text``).

HF names (``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``) and Flax paths (``sgtv_jax.models.gemma``)::

    model.embed_tokens.weight [V, D]                 <-> ("embed_tokens", "embedding")   (unscaled, as stored)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  <-> ("blocks", i, "self_attn", "q_proj", "kernel")  transposed
    model.layers.{i}.self_attn.{q,k}_norm.weight [Dh] <-> (..., "q_norm", "scale")              (gemma3)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   <-> ("blocks", i, "mlp", "gate_proj", "kernel")  transposed
    model.layers.{i}.{input,post_attention,pre_feedforward,post_feedforward}_layernorm.weight
                                                      <-> ("blocks", i, "<that norm>", "scale")
    model.norm.weight                                 <-> ("norm", "scale")
    lm_head.weight                                    <-> ("lm_head", "kernel") transposed; absent when tied

Norm weights are HF's ``w`` of ``(1 + w)`` as stored. Ignored: rotary
``inv_freq`` buffers and the ``lm_head.weight`` copy of a tied checkpoint.
"""

from __future__ import annotations

from typing import Any

from sgtv_jax.models.gemma import GemmaConfig, hf_block_prefix

from ._base import NameMap, Rule, block_rules


def _config(config: Any) -> GemmaConfig:
    return config if isinstance(config, GemmaConfig) else GemmaConfig.from_hf(config)


def _rules(cfg: GemmaConfig) -> list[Rule]:
    d, f, v, dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * dh, cfg.num_key_value_heads * dh
    rules = [Rule("model.embed_tokens.weight", ("embed_tokens", "embedding"), False, (v, d))]
    for i in range(cfg.num_hidden_layers):
        e: list[tuple[str, str, bool, tuple[int, ...]]] = [
            ("self_attn.q_proj.weight", "kernel", True, (q, d)),
            ("self_attn.k_proj.weight", "kernel", True, (kv, d)),
            ("self_attn.v_proj.weight", "kernel", True, (kv, d)),
            ("self_attn.o_proj.weight", "kernel", True, (d, q)),
        ]
        if cfg.attention_bias:
            e += [
                ("self_attn.q_proj.bias", "bias", False, (q,)),
                ("self_attn.k_proj.bias", "bias", False, (kv,)),
                ("self_attn.v_proj.bias", "bias", False, (kv,)),
                ("self_attn.o_proj.bias", "bias", False, (d,)),
            ]
        if cfg.qk_norm:
            e += [
                ("self_attn.q_norm.weight", "scale", False, (dh,)),
                ("self_attn.k_norm.weight", "scale", False, (dh,)),
            ]
        e += [
            ("mlp.gate_proj.weight", "kernel", True, (f, d)),
            ("mlp.up_proj.weight", "kernel", True, (f, d)),
            ("mlp.down_proj.weight", "kernel", True, (d, f)),
        ]
        e += [
            (f"{n}.weight", "scale", False, (d,))
            for n in (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            )
        ]
        rules += block_rules(hf_block_prefix(i), ("blocks", i), e)
    rules.append(Rule("model.norm.weight", ("norm", "scale"), False, (d,)))
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), True, (v, d)))
    return rules


NAME_MAP = NameMap(
    family="gemma",
    rules_fn=_rules,
    normalize_fn=lambda name: name,
    # lm_head.weight only matches here when the config ties it (then it is a copy of the embedding).
    ignore_patterns=[r"\.rotary_emb\.", r"^lm_head\.weight$"],
    config_fn=_config,
)
