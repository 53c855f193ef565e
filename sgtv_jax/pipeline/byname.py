"""Which tensors a data-free merge writes, and from what: the plan of a merge by tensor name.

A data-free merge (no tensor uses `sparsegpt` / `wanda`, the method needs no
Gram matrices) needs no model of the architecture: it pairs the tensors of the
base and of every fine-tuned model by name, from the checkpoints' headers.
`plan_by_name` decides, for every tensor the output will hold, one of

    merge  every model has it (or, for an output head, its tied embedding) with
           the base's shape: trimmed and merged by the config's method
    base   copied from the base: a non-float tensor (integer buffers), a tensor
           some fine-tuned model lacks, or a buffer a registered architecture's
           name map does not list as a parameter
    copy   copied from the first fine-tuned model that has it: the base lacks it

and refuses (`ConfigError`, every problem listed) different architectures,
vocabulary sizes and tensor shapes. The rules, in the words docs/merging.md uses:

* Vocabulary sizes (config `vocab_size`, or rows of a tensor whose differing
  sizes are the models' vocabulary sizes) must agree: nothing is truncated or
  padded; merging different vocabularies needs `tokenizer_source`.
* Tied heads: a model whose config ties its word embeddings
  (`tie_word_embeddings`, transformers' default where the config omits it)
  uses its input embedding as its output head, stored or not. The output is
  tied when every model ties; when the base ties and a fine-tuned model does
  not, the output unties (config `tie_word_embeddings: false`) and its head is
  the merge of every model's head (a tied model's head: its embedding). A
  head tensor stored by a model whose config ties it is not read.
* Decoder-block position (for gradient parameters): the first `.layers.N.`,
  `.layer.N.`, `.h.N.`, `.blocks.N.` or `.block.N.` in a name gives block N of
  the stack named by what precedes it (T5's `encoder.block.` and
  `decoder.block.` are two stacks); the stack's depth is the base's largest
  N + 1, which is `num_hidden_layers` / `n_layer` of config.json for a
  decoder-only model. A name without such a part sits at position 0 when it
  contains `embed`, `wte` or `wpe`, else at 1.
* Layout: 2-D tensors are merged as stored (PyTorch `[out, in]` for
  `nn.Linear`), so row-wise trims work per stored row; for an architecture
  with a Flax family here, as its name map orients it (GPT-2's Conv1D
  weights and the embeddings are merged in the `[in, out]`-swapped view, as
  the block-by-block merge always has).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from convert.architectures import ARCHITECTURES
from convert.dtypes import is_float
from convert.readers import hf_config_object
from sgtv_jax.pipeline.config import ConfigError

MERGE, BASE, COPY = "merge", "base", "copy"
ACTIONS = (MERGE, BASE, COPY)

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
"""A decoder block's index in a tensor name: `model.layers.3.`, `transformer.h.3.`, `encoder.block.3.`."""

_EMBED_HINTS = ("embed", "wte", "word_embeddings", "shared")


def block_of(name: str) -> tuple[str, int] | None:
    """(stack, index) of the first block index in `name`, e.g. `("model.layers.", 3)`; None: outside blocks."""
    m = LAYER_PATTERN.search(name)
    if m is None:
        return None
    return name[: m.start(1)], int(m.group(1))


def stack_depths(names: Sequence[str]) -> dict[str, int]:
    """Depth (largest index + 1) of every stack of blocks among tensor `names`."""
    depths: dict[str, int] = {}
    for n in names:
        b = block_of(n)
        if b is not None:
            depths[b[0]] = max(depths.get(b[0], 0), b[1] + 1)
    return depths


def ties_head(config: dict[str, Any]) -> bool:
    """Whether a model's config ties its output head to its input embedding.

    The config's `tie_word_embeddings`, else the transformers config class's
    default for its `model_type` (no weights, no torch), else True (the
    `PretrainedConfig` default).
    """
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    try:
        return bool(getattr(hf_config_object(config), "tie_word_embeddings", True))
    except Exception:  # noqa: BLE001 - a model_type transformers does not know: its base default
        return True


def vocab_size_of(config: dict[str, Any]) -> int | None:
    """`vocab_size` of a config (or of its `text_config`); None when it has none."""
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return int(v) if isinstance(v, int) else None


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One output tensor.

    action: `merge` / `base` / `copy` (module doc); shape: its shape;
    sources: for `merge`, the tensor read from the base and from each model
    (`T + 1` names; differs from `name` only for a tied head); source: for
    `copy`, the fine-tuned model it comes from; block, depth: decoder block and
    its stack's depth (None, 0 outside blocks); transpose: merge the 2-D tensor
    in the swapped view; reason: why a tensor is not merged as usual.
    readers: the checkpoint each of `sources` is read from (0 the base, t + 1
    model t; empty: the base then every model, in order); vocab_rows: one row
    per vocabulary entry, re-indexed to the output vocabulary
    (`pipeline.tokenizer`); group: the output slice it belongs to (-1: none).
    """

    name: str
    action: str
    shape: tuple[int, ...]
    sources: tuple[str, ...] = ()
    source: int = -1
    block: int | None = None
    depth: int = 0
    transpose: bool = False
    reason: str | None = None
    readers: tuple[int, ...] = ()
    vocab_rows: bool = False
    group: int = -1


@dataclasses.dataclass(frozen=True)
class NamePlan:
    """Every output tensor (`entries`, in the base's order), the output config and the rules applied."""

    model_type: str
    entries: tuple[TensorEntry, ...]
    config: dict[str, Any]
    rules: tuple[dict[str, Any], ...]
    depths: dict[str, int]
    vocab_size: int | None
    registered: bool

    @property
    def num_layers(self) -> int:
        """The deepest stack of blocks (the decoder's layer count for a decoder-only model)."""
        return max(self.depths.values(), default=0)

    def largest(self, action: str = MERGE) -> int:
        """Elements of the largest tensor with `action`."""
        sizes = [_numel(e.shape) for e in self.entries if e.action == action]
        return max(sizes, default=0)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _Headers:
    """Names, shapes and dtypes of one checkpoint (headers only)."""

    def __init__(self, ckpt: Any, label: str) -> None:
        self.label = label
        self.config = dict(ckpt.config)
        self.order = list(ckpt.names())
        self.names = set(self.order)
        self.shapes = {n: tuple(int(d) for d in ckpt.shape(n)) for n in self.order}
        self.dtypes = {n: ckpt.dtype(n) for n in self.order}
        self.ties = ties_head(self.config)
        self.vocab = vocab_size_of(self.config)


def _tie_partner(
    head: str, shape: tuple[int, ...], everywhere: list[str], shapes: dict[str, tuple[int, ...]], vocab: int | None
) -> str | None:
    """The input embedding a tied `head` `[vocab, hidden]` stands for; None when there is not exactly one.

    It is the tensor every model has with the head's shape and a name that
    says embedding (`embed`, `wte`, `word_embeddings`, `shared`).
    """
    if vocab is not None and shape[0] != vocab:
        return None
    same = [n for n in everywhere if n != head and shapes[n] == shape and any(h in n for h in _EMBED_HINTS)]
    return same[0] if len(same) == 1 else None


def _name_map_layout(model_type: str, config: dict[str, Any]) -> Any:
    """`name -> Rule | None` (ValueError for unknown names) of a registered architecture, else None.

    None too when the family cannot describe this config (a feature its Flax
    model lacks): a data-free merge does not need the model, so it goes on as
    for any architecture.
    """

    row = ARCHITECTURES.get(model_type)
    if row is None:
        return None

    try:
        obj = hf_config_object(config)
        row.name_map.rules(obj)
    except Exception:  # noqa: BLE001 - any reason the family cannot take this config
        return None
    return lambda name: row.name_map.rule_for_hf(name, obj)


def _vocab_problem(name: str, shapes: list[tuple[str, tuple[int, ...]]], vocabs: set[int]) -> str | None:
    """A message when `name`'s shapes differ in one axis whose sizes are the models' vocabulary sizes."""
    dims = {len(s) for _, s in shapes}
    if len(dims) != 1:
        return None
    rank = dims.pop()
    for ax in range(rank):
        sizes = {s[ax] for _, s in shapes}
        others_equal = all(len({s[a] for _, s in shapes}) == 1 for a in range(rank) if a != ax)
        if len(sizes) > 1 and others_equal and sizes & vocabs:
            listed = ", ".join(f"{lab}: {s[ax]}" for lab, s in shapes)
            return f"tensor {name!r} has one row per vocabulary entry and the vocabularies differ ({listed})"
    return None


def vocab_message(detail: str) -> str:
    """The refusal of a vocabulary mismatch, pointing at what would fix it."""
    return (
        f"{detail}: models with different vocabularies cannot be merged row by row (nothing is truncated "
        "or padded). Merging them needs tokenizer_source (a union or chosen tokenizer with embeddings "
        "mapped to it), which is not supported yet; if the extra rows are only padding, resize that "
        "model's embeddings to the base's vocabulary first (transformers: model.resize_token_embeddings(n))"
    )


_VOCAB_HINTS = _EMBED_HINTS + ("lm_head", "embed_out", "output", "head")


def is_vocab_tensor(name: str, shape: tuple[int, ...], vocab: int | None) -> bool:
    """Whether tensor `name` `shape` has one row per vocabulary entry of a model with `vocab` tokens."""
    return vocab is not None and len(shape) == 2 and shape[0] == vocab and any(h in name for h in _VOCAB_HINTS)


def plan_by_name(
    base: Any,
    models: Sequence[Any],
    *,
    base_label: str = "base_model",
    labels: Sequence[str] | None = None,
    vocab_out: int | None = None,
) -> NamePlan:
    """The `NamePlan` of merging open checkpoints `models` onto `base` (headers and configs only).

    `base_label` / `labels` name the checkpoints in messages (as the YAML
    wrote them). `vocab_out`: the output vocabulary size when the models'
    vocabulary-indexed tensors are re-indexed to one vocabulary
    (`pipeline.tokenizer`): their sizes may then differ, the entries say
    `vocab_rows` and have `vocab_out` rows. Raises `ConfigError` listing
    every problem.
    """
    labels = list(labels) if labels is not None else [f"models[{t}]" for t in range(len(models))]
    b = _Headers(base, base_label)
    fts = [_Headers(m, lab) for m, lab in zip(models, labels)]
    mt = str(b.config.get("model_type"))
    _refuse_other_architectures(b, fts, mt)
    problems: list[str] = []
    vocab_names, vocabs = _vocab_axes([b] + fts, vocab_out, problems)
    union = list(dict.fromkeys(b.order + [n for h in fts for n in h.order]))
    heads = _tied_heads(b, fts, union, vocab_out if vocab_names else b.vocab)
    pairing = _Pairing(b, fts, vocabs, _name_map_layout(mt, b.config) if not problems else None, mt, problems)
    depths = stack_depths(b.order)
    out_config = dict(b.config)
    entries: list[TensorEntry] = []
    for n in b.order + [n for n in union if n not in b.names]:
        blk = block_of(n)
        where = (None, 0) if blk is None else (blk[1], depths.get(blk[0], blk[1] + 1))
        if n in heads:
            entry = _head_entry(n, heads[n], b, fts, out_config, pairing.rules, *where)
        else:
            entry = pairing.entry(n, *where)
        if entry is not None:
            entries.append(entry)
    if problems:
        raise ConfigError("merge check failed:\n  - " + "\n  - ".join(problems))
    if vocab_names:
        out_config["vocab_size"] = vocab_out
        entries = [
            dataclasses.replace(e, vocab_rows=True)
            if e.name in vocab_names or any(s in vocab_names for s in e.sources)
            else e
            for e in entries
        ]
    return NamePlan(
        mt,
        tuple(entries),
        out_config,
        tuple(pairing.rules),
        depths,
        next(iter(vocabs)) if vocabs else None,
        pairing.name_map is not None,
    )


def _refuse_other_architectures(b: _Headers, fts: list[_Headers], mt: str) -> None:
    """ConfigError listing every model whose `model_type` is not the base's `mt`."""
    problems = [
        f"{h.label}: architecture {h.config.get('model_type')!r} differs from the base model's {mt!r}"
        for h in fts
        if h.config.get("model_type") != b.config.get("model_type")
    ]
    if problems:
        raise ConfigError("incompatible models:\n  - " + "\n  - ".join(problems))


def _vocab_axes(everyone: list[_Headers], vocab_out: int | None, problems: list[str]) -> tuple[set[str], set[int]]:
    """(the vocabulary-indexed tensors re-indexed to `vocab_out` rows, the vocabulary sizes left to compare).

    Sets the re-indexed tensors' shapes to `vocab_out` rows in each header, so
    they compare by their other axes; appends to `problems` when the configs'
    vocabulary sizes still differ.
    """
    vocabs = {h.vocab for h in everyone if h.vocab is not None}
    vocab_names = {
        n
        for n in {n for h in everyone for n in h.order}
        if vocab_out is not None and all(is_vocab_tensor(n, h.shapes[n], h.vocab) for h in everyone if n in h.names)
    }
    if vocab_names:  # re-indexed to one vocabulary: compare them by their other axes
        for h in everyone:
            for n in vocab_names & h.names:
                h.shapes[n] = (int(vocab_out or 0),) + h.shapes[n][1:]
        vocabs = {int(vocab_out or 0)}
    if len(vocabs) > 1:
        listed = ", ".join(f"{h.label}: {h.vocab}" for h in everyone)
        problems.append(vocab_message(f"vocabulary sizes (config vocab_size) differ ({listed})"))
    return vocab_names, vocabs


def _tied_heads(b: _Headers, fts: list[_Headers], union: list[str], vocab: int | None) -> dict[str, str]:
    """Output heads that some (tied) models do not store: head name -> the tied input embedding standing in."""
    everyone = [b] + fts
    in_all = [n for n in b.order if all(n in h.names for h in fts)]
    heads: dict[str, str] = {}
    for n in union:
        holders = [h for h in everyone if n in h.names]
        lacking = [h for h in everyone if n not in h.names]
        if not lacking or not all(h.ties for h in lacking):
            continue
        shape = holders[0].shapes[n]
        if len(shape) != 2:
            continue
        partner = _tie_partner(n, shape, in_all, b.shapes, vocab)
        if partner is not None:
            heads[n] = partner
    return heads


def _from_base(n: str, shape: tuple[int, ...], blk: int | None, depth: int, reason: str) -> TensorEntry:
    """Tensor `n` copied from the base, for `reason`."""
    return TensorEntry(n, BASE, shape, block=blk, depth=depth, reason=reason)


@dataclasses.dataclass
class _Pairing:
    """Decides each tensor other than a tied head by its name; collects `problems` and `rules` on the way."""

    b: _Headers
    fts: list[_Headers]
    vocabs: set[int]
    name_map: Any
    mt: str
    problems: list[str]
    rules: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def entry(self, n: str, blk: int | None, depth: int) -> TensorEntry | None:
        """Tensor `n`'s entry (None: a problem, listed); block `blk` of a stack `depth` deep."""
        b, fts = self.b, self.fts
        if n not in b.names:
            first = next(t for t, h in enumerate(fts) if n in h.names)
            label = fts[first].label
            self.rules.append(
                {
                    "tensor": n,
                    "rule": "copied from the first model having it",
                    "detail": f"the base lacks it; taken from {label}",
                }
            )
            reason = f"not in the base: copied from {label}"
            return TensorEntry(n, COPY, fts[first].shapes[n], source=first, block=blk, depth=depth, reason=reason)
        shape = b.shapes[n]
        without = [h.label for h in fts if n not in h.names]
        if without:
            self.rules.append(
                {"tensor": n, "rule": "taken from the base", "detail": f"{', '.join(without)} lack(s) it"}
            )
            return _from_base(n, shape, blk, depth, f"missing in {', '.join(without)}: taken from the base")
        shapes = [(h.label, h.shapes[n]) for h in [b] + fts]
        if len({s for _, s in shapes}) > 1:
            why = _vocab_problem(n, shapes, self.vocabs)
            if why is not None:
                if len(self.vocabs) <= 1:  # the configs agree but the tensors do not: say so once per tensor
                    self.problems.append(vocab_message(why))
            else:
                self.problems.append(
                    f"tensor {n!r} has different shapes: " + ", ".join(f"{lab} {list(s)}" for lab, s in shapes)
                )
            return None
        if not is_float(b.dtypes[n]):
            return _from_base(n, shape, blk, depth, f"{b.dtypes[n]} tensor (not a weight): taken from the base")
        return self._merged(n, shape, blk, depth)

    def _merged(self, n: str, shape: tuple[int, ...], blk: int | None, depth: int) -> TensorEntry:
        """A float tensor every model has with one shape: merged, oriented as the name map says (if any)."""
        transpose = False
        if self.name_map is not None:
            try:
                rule = self.name_map(n)
            except ValueError:
                rule = False  # a name the name map does not know: merged as stored, like any architecture
            if rule is None:
                return _from_base(
                    n, shape, blk, depth, f"not a parameter of the {self.mt} name map: taken from the base"
                )
            transpose = bool(rule) and len(shape) == 2 and not rule.transpose
        sources = (n,) * (1 + len(self.fts))
        return TensorEntry(n, MERGE, shape, sources=sources, block=blk, depth=depth, transpose=transpose)


def _head_entry(
    head: str,
    embed: str,
    b: _Headers,
    fts: list[_Headers],
    out_config: dict[str, Any],
    rules: list[dict[str, Any]],
    blk: int | None,
    depth: int,
) -> TensorEntry | None:
    """The output head `head` that tied models do not store (`embed` stands in for it), or None (tied output)."""
    everyone = [b] + fts
    # a model's head: its own stored head when its config unties it, else its input embedding
    sources = tuple(head if (head in h.names and not h.ties) else embed for h in everyone)
    ignored = [h.label for h in everyone if head in h.names and h.ties]
    if ignored:
        rules.append(
            {
                "tensor": head,
                "rule": "tied head not read",
                "detail": f"{', '.join(ignored)} store(s) {head!r} but tie it to {embed!r} (config): "
                "transformers uses the embedding, so does the merge",
            }
        )
    untied = [h.label for h, s in zip(everyone, sources) if s == head]
    if not untied:
        rules.append(
            {
                "tensor": head,
                "rule": "tied output",
                "detail": f"every model ties {head!r} to {embed!r}: only the embedding is merged",
            }
        )
        return None
    tied = [h.label for h, s in zip(everyone, sources) if s == embed]
    if sources[0] == embed:
        out_config["tie_word_embeddings"] = False
        rules.append(
            {
                "tensor": head,
                "rule": "untied output",
                "detail": f"the base ties its head but {', '.join(untied)} do(es) not: the output unties "
                f"(tie_word_embeddings: false) and {head!r} merges every model's head, "
                f"{', '.join(tied)} contributing its embedding {embed!r}",
            }
        )
    else:
        rules.append(
            {
                "tensor": head,
                "rule": "tied model's head is its embedding",
                "detail": f"{', '.join(tied)} tie(s) the head: {embed!r} is its head in the merge",
            }
        )
    return TensorEntry(
        head,
        MERGE,
        b.shapes[embed],
        sources=sources,
        block=blk,
        depth=depth,
        reason="head merged with tied models' embeddings",
    )
