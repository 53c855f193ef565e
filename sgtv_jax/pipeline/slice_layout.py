"""What every `slices` source must share with the output, checked from configs and headers before any tensor is read.

A merge with `slices` writes one config (the base's, `slices.py`) for layers
taken from several models, so each source must have been built with that
config's value of every field that shapes or computes a decoder layer
(`LAYER_FIELDS`: widths, head counts, activation, norm epsilon, rotary
settings, experts); the sources of the tensors outside the layers
(embeddings from the first slice, final norm and head from the last) must
share its vocabulary and tying as well, unless a tokenizer re-indexes the
vocabulary. A field given per layer (a list with one entry per layer) is
rebuilt layer by layer and not compared. `OutputLayout` then checks every
planned tensor's shape against the output's layout (the base's tensor, or
the one shape the base's layers share for that name), which catches what no
listed field says. Without these checks, layers of a 32-wide model under a
64-wide config merge "successfully" into a checkpoint no loader accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Fields a decoder layer's tensors or computation depend on (the names HF configs use across families).
LAYER_FIELDS = (
    "model_type",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "num_kv_heads",
    "multi_query",
    "head_dim",
    "intermediate_size",
    "n_inner",
    "ffn_dim",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "hidden_act",
    "hidden_activation",
    "activation_function",
    "attention_bias",
    "mlp_bias",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
    "rotary_dim",
    "sliding_window",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
)
# Fields the tensors outside the layers (embeddings, head) depend on.
OUTER_FIELDS = ("vocab_size", "tie_word_embeddings", "final_logit_softcapping")


def _values(config: dict[str, Any], fields: Sequence[str], depth: int) -> dict[str, Any]:
    """`{field: value}` of `config` and its `text_config` (as `text_config.field`), per-layer lists left out."""
    out: dict[str, Any] = {}
    for prefix, c in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(c, dict):
            continue
        for f in fields:
            v = c.get(f)
            if not (isinstance(v, list) and len(v) == depth and depth > 1):
                out[prefix + f] = v
    return out


def source_problems(
    cfg: Any,
    configs: Sequence[dict[str, Any]],
    depths: Sequence[int],
    readers: Sequence[Sequence[int]],
    out_label: str,
    *,
    vocab_mapped: bool,
) -> list[str]:
    """Every field a slice source disagrees on with the output config (checkpoint 0's), naming both values.

    `configs[m]` / `depths[m]`: config and layer count of checkpoint m (0 the
    base); `readers[k][j]`: the checkpoint of slice k's source j.
    `vocab_mapped`: a tokenizer re-indexes the vocabulary (its size may differ).
    """
    problems: list[str] = []
    seen: set[tuple[int, str]] = set()
    last = len(cfg.slices) - 1
    outer = tuple(f for f in OUTER_FIELDS if not (vocab_mapped and f == "vocab_size"))
    want = _values(configs[0], LAYER_FIELDS + outer, depths[0])
    for k, sl in enumerate(cfg.slices):
        fields = LAYER_FIELDS + (outer if k in (0, last) else ())
        for j, s in enumerate(sl.sources):
            m = readers[k][j]
            if m == 0:
                continue  # the output config's own model
            have = _values(configs[m], fields, depths[m])
            for f, v in have.items():
                if f in want and v != want[f] and (m, f) not in seen:
                    seen.add((m, f))
                    problems.append(
                        f"slices[{k}].sources[{j}] ({s.label}): {f} = {v!r}, but the output config, "
                        f"taken from {out_label}, has {f} = {want[f]!r}"
                    )
    return problems


class OutputLayout:
    """The tensor shapes the output config implies, from its model's headers (checkpoint 0)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], stack: str, label: str) -> None:
        self.label = label
        self.outer = {n: s for n, s in shapes.items() if not n.startswith(stack)}
        by_suffix: dict[str, set[tuple[int, ...]]] = {}
        for n, s in shapes.items():
            if n.startswith(stack):
                suffix = n[len(stack) :].partition(".")[2]
                by_suffix.setdefault(suffix, set()).add(s)
        # a name whose shape varies over the base's layers has no single expected shape: not checked
        self.layer = {suf: next(iter(ss)) for suf, ss in by_suffix.items() if len(ss) == 1}

    def problem(
        self, name: str, suffix: str | None, shape: tuple[int, ...], source: str, vocab_rows: bool
    ) -> str | None:
        """Why output tensor `name` (layer tensor `suffix`, or outer) of `shape` from `source` breaks the layout."""
        want = self.outer.get(name) if suffix is None else self.layer.get(suffix)
        if want is None or tuple(shape) == want or (vocab_rows and tuple(shape[1:]) == want[1:]):
            return None
        return (
            f"output tensor {name!r}: {source} gives shape {list(shape)}, but the output config, "
            f"taken from {self.label}, has {list(want)} there"
        )
