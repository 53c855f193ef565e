"""HF <-> Flax name map for BERT encoders (e.g. all-MiniLM-L6-v2).

HF names (``BertModel``; a ``bert.`` prefix as in ``BertForMaskedLM`` is
accepted and its ``cls.*`` heads ignored) and Flax paths (``sgtv_jax.models.bert``)::

    embeddings.word_embeddings.weight          <-> ("embeddings", "word_embeddings", "embedding")
    embeddings.position_embeddings.weight      <-> ("embeddings", "position_embeddings", "embedding")
    embeddings.token_type_embeddings.weight    <-> ("embeddings", "token_type_embeddings", "embedding")
    embeddings.LayerNorm.weight / .bias        <-> ("embeddings", "LayerNorm", "scale" / "bias")
    encoder.layer.{i}.attention.self.query.weight <-> ("blocks", i, "attention", "self", "query", "kernel") transposed
    ... attention.self.key/value, attention.output.dense, attention.output.LayerNorm,
        intermediate.dense, output.dense, output.LayerNorm
    pooler.dense.weight / .bias                <-> ("pooler", "dense", "kernel" / "bias") (if the model has a pooler)

Ignored: the ``embeddings.position_ids`` / ``token_type_ids`` buffers of old
checkpoints, ``cls.*`` pretraining heads, and ``pooler.*`` when the Flax model
was built without a pooler.

Interface: see ``convert.namemaps.llama`` (same functions).
"""

from __future__ import annotations

from typing import Any

from sgtv_jax.models.bert import BertConfig, hf_block_prefix

from ._base import NameMap, Rule, block_rules, dense, layer_norm, module_getattr


def _config(config: Any) -> BertConfig:
    return config if isinstance(config, BertConfig) else BertConfig.from_hf(config)


def _rules(cfg: BertConfig) -> list[Rule]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    e = ("embeddings",)
    rules = [
        Rule("embeddings.word_embeddings.weight", e + ("word_embeddings", "embedding"), False, (cfg.vocab_size, d)),
        Rule(
            "embeddings.position_embeddings.weight",
            e + ("position_embeddings", "embedding"),
            False,
            (cfg.max_position_embeddings, d),
        ),
        Rule(
            "embeddings.token_type_embeddings.weight",
            e + ("token_type_embeddings", "embedding"),
            False,
            (cfg.type_vocab_size, d),
        ),
        Rule("embeddings.LayerNorm.weight", e + ("LayerNorm", "scale"), False, (d,)),
        Rule("embeddings.LayerNorm.bias", e + ("LayerNorm", "bias"), False, (d,)),
    ]
    for i in range(cfg.num_hidden_layers):
        rules += block_rules(
            hf_block_prefix(i),
            ("blocks", i),
            [
                *dense("attention.self.query", (d, d), transpose=True),
                *dense("attention.self.key", (d, d), transpose=True),
                *dense("attention.self.value", (d, d), transpose=True),
                *dense("attention.output.dense", (d, d), transpose=True),
                *layer_norm("attention.output.LayerNorm", d),
                *dense("intermediate.dense", (f, d), transpose=True),
                *dense("output.dense", (d, f), transpose=True),
                *layer_norm("output.LayerNorm", d),
            ],
        )
    if cfg.add_pooling_layer:
        rules += [
            Rule("pooler.dense.weight", ("pooler", "dense", "kernel"), True, (d, d)),
            Rule("pooler.dense.bias", ("pooler", "dense", "bias"), False, (d,)),
        ]
    return rules


def _normalize(name: str) -> str:
    name = name[len("bert.") :] if name.startswith("bert.") else name
    # Pre-2019 checkpoints spell LayerNorm parameters gamma/beta.
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


NAME_MAP = NameMap(
    family="bert",
    rules_fn=_rules,
    normalize_fn=_normalize,
    ignore_patterns=[r"^embeddings\.position_ids$", r"^embeddings\.token_type_ids$", r"^cls\.", r"^pooler\."],
    config_fn=_config,
)

__getattr__ = module_getattr(NAME_MAP, __name__)  # hf_to_flax, flax_to_hf, ... of NAME_MAP
