"""HF <-> Flax name map for GPT-2.

HF names (``GPT2LMHeadModel``; ``GPT2Model`` names without ``transformer.``
are accepted too) and Flax paths (``sgtv_jax.models.gpt2``)::

    transformer.wte.weight [V, D]             <-> ("wte", "embedding")
    transformer.wpe.weight [P, D]             <-> ("wpe", "embedding")
    transformer.h.{i}.ln_1.weight / .bias     <-> ("blocks", i, "ln_1", "scale" / "bias")
    transformer.h.{i}.attn.c_attn.weight [D, 3D] <-> ("blocks", i, "attn", "c_attn", "kernel")  NOT transposed
    transformer.h.{i}.attn.c_proj / mlp.c_fc / mlp.c_proj  (Conv1D, already [in, out])
    transformer.ln_f.weight / .bias           <-> ("ln_f", "scale" / "bias")
    lm_head.weight [V, D]                     <-> ("lm_head", "kernel") transposed; absent when tied (default)

Conv1D weights are already ``[in, out]``, so no tensor is transposed except
an untied ``lm_head``. ``c_attn`` stays fused (``[D, 3D]``, columns q|k|v).
Ignored: the ``attn.bias`` / ``attn.masked_bias`` causal-mask buffers of old
checkpoints and a tied checkpoint's ``lm_head.weight``.

Interface: see ``convert.namemaps.llama`` (same functions).
"""

from __future__ import annotations

from typing import Any

from sgtv_jax.models.gpt2 import GPT2Config, hf_block_prefix

from ._base import NameMap, Rule, block_rules, dense, layer_norm, module_getattr


def _config(config: Any) -> GPT2Config:
    return config if isinstance(config, GPT2Config) else GPT2Config.from_hf(config)


def _rules(cfg: GPT2Config) -> list[Rule]:
    d, f, v = cfg.n_embd, cfg.n_inner, cfg.vocab_size
    rules = [
        Rule("transformer.wte.weight", ("wte", "embedding"), False, (v, d)),
        Rule("transformer.wpe.weight", ("wpe", "embedding"), False, (cfg.n_positions, d)),
    ]
    for i in range(cfg.n_layer):
        rules += block_rules(
            hf_block_prefix(i),
            ("blocks", i),
            [  # Conv1D layers: weights stored [in, out], so not transposed
                *layer_norm("ln_1", d),
                *dense("attn.c_attn", (d, 3 * d), transpose=False),
                *dense("attn.c_proj", (d, d), transpose=False),
                *layer_norm("ln_2", d),
                *dense("mlp.c_fc", (d, f), transpose=False),
                *dense("mlp.c_proj", (f, d), transpose=False),
            ],
        )
    rules += [
        Rule("transformer.ln_f.weight", ("ln_f", "scale"), False, (d,)),
        Rule("transformer.ln_f.bias", ("ln_f", "bias"), False, (d,)),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), True, (v, d)))
    return rules


def _normalize(name: str) -> str:
    # GPT2Model checkpoints (e.g. the original "gpt2" repo) have no "transformer." prefix.
    if name.startswith(("wte.", "wpe.", "h.", "ln_f.")):
        return "transformer." + name
    return name


NAME_MAP = NameMap(
    family="gpt2",
    rules_fn=_rules,
    normalize_fn=_normalize,
    ignore_patterns=[r"\.attn\.bias$", r"\.attn\.masked_bias$", r"^lm_head\.weight$"],
    config_fn=_config,
)

__getattr__ = module_getattr(NAME_MAP, __name__)  # hf_to_flax, flax_to_hf, ... of NAME_MAP
