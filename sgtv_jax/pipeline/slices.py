"""The plan of a merge with `slices`: which source tensors make each output tensor (mergekit's rules).

Output decoder layers are the slices' layers stacked in order: slice k's
layer i (of n) is output layer `sum of earlier slices' n + i`, made from layer
`start_j + i` of every source j of the slice (merged by the config's method,
or copied byte for byte by `passthrough`). The tensors outside the layers come
from the first slice's sources when they sit before the layers (names with
`embed`, `wte`, `wpe`: embeddings) and from the last slice's sources otherwise
(final norm, output head). Gradient parameters run over each slice's own
layers: position `i / (n - 1)`, 1 for a one-layer slice; outside the layers
0 for the embeddings and 1 for the final norm and head (mergekit's `plan.py`).

The output config is the base model's (`base_model`, else the first slice's
first model) with its layer count (`num_hidden_layers` / `n_layer`) set to the
total, and every per-layer list in it (a list as long as the base's layer
count, e.g. `layer_types`) rebuilt from the lists of the models each output
layer comes from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from convert.dtypes import is_float
from sgtv_jax.merge.paramspec import EMBEDDING_MARKS
from sgtv_jax.pipeline.byname import (
    BASE,
    COPY,
    MERGE,
    NamePlan,
    TensorEntry,
    _Headers,
    _name_map_layout,
    block_of,
    is_vocab_tensor,
    stack_depths,
)
from sgtv_jax.pipeline.config import ConfigError, MergeConfig, slice_roles
from sgtv_jax.pipeline.slice_layout import OutputLayout, source_problems

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def checkpoint_index(cfg: MergeConfig, model: str, adapter: str = "") -> int:
    """The checkpoint of a slice source: 0 the base, t + 1 `cfg.models[t]`."""
    if model == cfg.base_model and not adapter:
        return 0
    return 1 + next(t for t, m in enumerate(cfg.models) if m.model == model and m.adapter == adapter)


def _layer_count_key(config: dict[str, Any], depth: int) -> tuple[dict[str, Any], str] | None:
    """(the config mapping, its key) holding the layer count `depth` (top level or `text_config`)."""
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            for k in LAYER_COUNT_KEYS:
                if c.get(k) == depth:
                    return c, k
    return None


def _per_layer_lists(config: dict[str, Any], depth: int) -> list[tuple[str | None, str]]:
    """(sub-config or None, key) of every list in `config` with one entry per layer."""
    out: list[tuple[str | None, str]] = [
        (None, k) for k, v in config.items() if isinstance(v, list) and len(v) == depth and depth > 1
    ]
    tc = config.get("text_config")
    if isinstance(tc, dict):
        out += [("text_config", k) for k, v in tc.items() if isinstance(v, list) and len(v) == depth and depth > 1]
    return out


def _get(config: dict[str, Any], sub: str | None, key: str) -> Any:
    c = config.get(sub) if sub else config
    return c.get(key) if isinstance(c, dict) else None


def position(i: int, n: int) -> tuple[int, int]:
    """(block, depth) that puts layer `i` of an `n`-layer slice at mergekit's gradient position."""
    return (i, n) if n > 1 else (1, 2)  # one layer: t = 1


def plan_slices(
    cfg: MergeConfig, ckpts: Sequence[Any], labels: Sequence[str], vocab_out: int | None = None
) -> NamePlan:
    """The `NamePlan` of `cfg.slices` over open checkpoints `ckpts` (0 the base, t + 1 model t).

    Every entry names its `readers` (checkpoints) and `sources` (their tensor
    names), base first; `group` is its slice. `vocab_out`: re-index
    vocabulary-indexed tensors to this many rows (`pipeline.tokenizer`).
    Raises `ConfigError` listing every problem.
    """
    heads = [_Headers(c, lab) for c, lab in zip(ckpts, labels)]
    mt = str(heads[0].config.get("model_type"))
    stacks = [stack_depths(h.order) for h in heads]
    _refuse_unsliceable(heads, stacks, mt, labels[0])
    stack = next(iter(stacks[0]), "model.layers.")
    roles = [slice_roles(cfg, k) for k in range(len(cfg.slices))]
    readers = [
        tuple(checkpoint_index(cfg, s.model, s.adapter) for s in sl.sources) for sl in cfg.slices
    ]  # per slice, per source
    _refuse_bad_sources(cfg, heads, stacks, stack, readers, vocab_out)
    planner = _SlicePlanner(
        cfg,
        heads,
        stack,
        readers,
        roles,
        OutputLayout(heads[0].shapes, stack, labels[0]),
        _name_map_layout(mt, heads[0].config),
        vocab_out,
    )
    out_layer = planner.plan()
    config = _out_config(cfg, heads, readers, roles, stacks[0].get(stack, 0), out_layer)
    if planner.vocab_names:
        config["vocab_size"] = vocab_out
    rules = tuple(
        {
            "tensor": f"{stack}*",
            "rule": "slices",
            "detail": f"slices[{k}]: layers {list(sl.sources[0].layer_range)} of "
            + ", ".join(s.label for s in sl.sources),
        }
        for k, sl in enumerate(cfg.slices)
    )
    vocabs = {h.vocab for h in heads if h.vocab is not None}
    return NamePlan(
        mt,
        tuple(planner.entries),
        config,
        rules,
        {stack: out_layer},
        vocab_out if planner.vocab_names else (next(iter(vocabs)) if len(vocabs) == 1 else None),
        planner.name_map is not None,
    )


def _refuse(problems: list[str]) -> None:
    """ConfigError listing `problems`, if any."""
    if problems:
        raise ConfigError("slices cannot be planned:\n  - " + "\n  - ".join(problems))


def _refuse_unsliceable(heads: list[_Headers], stacks: list[dict[str, int]], mt: str, base_label: str) -> None:
    """ConfigError unless every checkpoint is of architecture `mt` with one stack of decoder layers."""
    problems = [
        f"{h.label}: architecture {h.config.get('model_type')!r} differs from {base_label}'s {mt!r}"
        for h in heads[1:]
        if h.config.get("model_type") != mt
    ]
    if any(len(s) > 1 for s in stacks):
        problems.append(
            "slices need one stack of decoder layers; these models have several ("
            + ", ".join(sorted({k for s in stacks for k in s}))
            + ")"
        )
    _refuse(problems)


def _refuse_bad_sources(
    cfg: MergeConfig,
    heads: list[_Headers],
    stacks: list[dict[str, int]],
    stack: str,
    readers: list[tuple[int, ...]],
    vocab_out: int | None,
) -> None:
    """ConfigError when a source's layer_range passes its model's layers, or a source is built unlike the output."""
    problems: list[str] = []
    for k, sl in enumerate(cfg.slices):
        for j, s in enumerate(sl.sources):
            depth = stacks[readers[k][j]].get(stack, 0)
            if s.layer_range[1] > depth:
                problems.append(
                    f"slices[{k}].sources[{j}].layer_range {list(s.layer_range)}: {s.label} has {depth} layers"
                )
    if not problems:  # every source built like the output config (slice_layout)
        depths = [s.get(stack, 0) for s in stacks]
        configs = [h.config for h in heads]
        problems = source_problems(cfg, configs, depths, readers, heads[0].label, vocab_mapped=vocab_out is not None)
    _refuse(problems)


@dataclasses.dataclass
class _SlicePlanner:
    """The entries of `cfg.slices` (module doc), with the problems found and the re-indexed vocabulary tensors.

    heads: each checkpoint's headers; stack: the decoder layers' name prefix;
    readers[k][j]: the checkpoint of slice k's source j; roles[k]: (its base
    source, its merged sources).
    """

    cfg: MergeConfig
    heads: list[_Headers]
    stack: str
    readers: list[tuple[int, ...]]
    roles: list[tuple[int, tuple[int, ...]]]
    layout: OutputLayout
    name_map: Any
    vocab_out: int | None
    problems: list[str] = dataclasses.field(default_factory=list)
    entries: list[TensorEntry] = dataclasses.field(default_factory=list)
    vocab_names: set[str] = dataclasses.field(default_factory=set)

    def plan(self) -> int:
        """Plan every output tensor: embeddings, the slices' layers, the rest; the output's layer count."""
        outside = [n for n in self.heads[0].order if block_of(n) is None]
        pre = [n for n in outside if any(e in n for e in EMBEDDING_MARKS)]
        for n in pre:
            self.outer(n, 0, 0, 1)  # before the layers: gradient position 0, as mergekit
        out_layer = 0
        for k, sl in enumerate(self.cfg.slices):
            for i in range(sl.num_layers):
                self.layer(k, i, out_layer)
                out_layer += 1
        for n in outside:
            if n not in pre:
                self.outer(n, len(self.cfg.slices) - 1, 1, 2)  # after the layers: position 1, as mergekit
        _refuse(self.problems)
        return out_layer

    def layer_names(self, m: int, layer: int) -> dict[str, str]:
        """Checkpoint `m`'s tensors of decoder layer `layer`: name after the layer's prefix -> full name."""
        prefix = f"{self.stack}{layer}."
        return {n[len(prefix) :]: n for n in self.heads[m].order if n.startswith(prefix)}

    def order(self, k: int) -> tuple[int, ...]:
        """Slice `k`'s sources, its base source first."""
        b, merged = self.roles[k]
        return (b,) + tuple(merged)

    def layer(self, k: int, i: int, out_layer: int) -> None:
        """Output layer `out_layer`: layer `i` of slice `k`."""
        sl = self.cfg.slices[k]
        per = [self.layer_names(self.readers[k][j], sl.sources[j].layer_range[0] + i) for j in self.order(k)]
        suffixes = list(per[0])
        if any(set(p) != set(suffixes) for p in per[1:]):
            self.problems.append(
                f"slices[{k}] layer {i}: the sources' layers hold different tensors: "
                + "; ".join(f"{sl.sources[j].label}: {sorted(p)[:4]}" for j, p in zip(self.order(k), per))
            )
            return
        block, depth = position(i, sl.num_layers)
        for suf in suffixes:
            srcs = [(self.readers[k][j], p[suf]) for j, p in zip(self.order(k), per)]
            self.add(f"{self.stack}{out_layer}.{suf}", k, srcs, block, depth)

    def outer(self, name: str, k: int, block: int, depth: int) -> None:
        """Tensor `name` outside the layers, from slice `k`'s sources."""
        srcs = []
        for j in self.order(k):
            m = self.readers[k][j]
            if name not in self.heads[m].names:
                self.problems.append(f"tensor {name!r} (slices[{k}]): {self.heads[m].label} lacks it")
                return
            srcs.append((m, name))
        self.add(name, k, srcs, block, depth)

    def add(self, name: str, k: int, srcs: list[tuple[int, str]], block: int | None, depth: int) -> None:
        """Output tensor `name` of slice `k` from `srcs` (checkpoint, tensor name), base source first."""
        heads = self.heads
        shapes = [heads[m].shapes[n] for m, n in srcs]
        vocab = self.vocab_out is not None and all(
            is_vocab_tensor(n, heads[m].shapes[n], heads[m].vocab) for m, n in srcs
        )
        if vocab:
            shapes = [(int(self.vocab_out or 0),) + s[1:] for s in shapes]
            self.vocab_names.add(name)
        if len(set(shapes)) > 1:
            self.problems.append(
                f"output tensor {name!r} (slices[{k}]): source shapes differ: "
                + ", ".join(f"{heads[m].label} {n} {list(heads[m].shapes[n])}" for m, n in srcs)
            )
            return
        m0, n0 = srcs[0]
        suffix = name[len(self.stack) :].partition(".")[2] if name.startswith(self.stack) else None
        why = self.layout.problem(name, suffix, shapes[0], f"{heads[m0].label} {n0}", vocab)
        if why is not None:
            self.problems.append(why)
            return
        copy = len(srcs) == 1 or not is_float(heads[m0].dtypes[n0])
        transpose = False
        if not copy and self.name_map is not None:
            try:
                rule = self.name_map(n0)
                transpose = bool(rule) and len(shapes[0]) == 2 and not rule.transpose
            except ValueError:
                pass
        self.entries.append(
            TensorEntry(
                name,
                BASE if copy and m0 == 0 else COPY if copy else MERGE,
                shapes[0],
                sources=tuple(n for _, n in srcs) if not copy else (n0,),
                source=m0 - 1,
                block=block,
                depth=depth,
                transpose=transpose,
                readers=tuple(m for m, _ in srcs) if not copy else (m0,),
                vocab_rows=vocab,
                group=k,
                reason=f"slices[{k}]: {heads[m0].label} {n0}" if copy else None,
            )
        )


def _out_config(
    cfg: MergeConfig,
    heads: list[_Headers],
    readers: list[tuple[int, ...]],
    roles: list[tuple[int, tuple[int, ...]]],
    depth: int,
    total: int,
) -> dict[str, Any]:
    """The base's config with the layer count `total` and per-layer lists rebuilt layer by layer."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in heads[0].config.items()}
    where = _layer_count_key(config, depth)
    if where is None:
        raise ConfigError(
            f"{heads[0].label}: no layer count ({', '.join(LAYER_COUNT_KEYS)}) equal to its {depth} layers in "
            "config.json, so the output's cannot be set"
        )
    where[0][where[1]] = total
    problems = []
    for sub, key in _per_layer_lists(heads[0].config, depth):
        values: list[Any] = []
        for k, sl in enumerate(cfg.slices):
            m = readers[k][roles[k][0]]
            lst = _get(heads[m].config, sub, key)
            src_depth = max(stack_depths(heads[m].order).values(), default=0)
            if not isinstance(lst, list) or len(lst) != src_depth:
                problems.append(
                    f"config {(sub + '.') if sub else ''}{key}: {heads[m].label} has no per-layer list to take "
                    f"slices[{k}]'s entries from"
                )
                continue
            values += lst[sl.sources[roles[k][0]].layer_range[0] : sl.sources[roles[k][0]].layer_range[1]]
        (config[sub] if sub else config)[key] = values
    if problems:
        raise ConfigError("slices cannot be planned:\n  - " + "\n  - ".join(problems))
    return config
