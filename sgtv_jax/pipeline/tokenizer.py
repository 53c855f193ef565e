"""The output vocabulary of a merge (`tokenizer_source` / `tokenizer:`) and each model's embeddings mapped to it.

As mergekit defines it:

* `base`: the base model's tokenizer; `union`: the base's tokenizer plus every
  token another model has (its ordinary tokens first, model by model in
  config order and by id, then the added / special tokens); a model path:
  that model's tokenizer. Tokens named under `tokenizer.tokens` are added when
  missing. The vocabulary size is the number of tokens, rounded up to
  `pad_to_multiple_of`.
* Every model's vocabulary-indexed tensors (input embedding, output head) are
  re-indexed to the output vocabulary before the merge. A token a model has
  keeps the model's row; a token it lacks gets a fill row: the configured
  source (`tokens:`: zero, a model's row of the token, or of another token),
  else the one model having it, else the base's row, else the mean of the
  rows of the models having it (so a model lacking a token adds no change of
  its own to it in a task-vector merge). A token no model has gets zeros and
  is listed in the report (`no_source`). Rows past the tokens (padding) are
  the mean of the token rows.
* A model without tokenizer files is taken to have the base's tokenizer.

Tokenizers are read with `transformers.AutoTokenizer` from local files only, each inside its
model folder (`convert.local_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.containment import read_contained_json, read_contained_text
from convert.local_tokenizer import load_local_tokenizer, tokenizer_digest
from sgtv_jax.pipeline.byname import vocab_size_of
from sgtv_jax.pipeline.chat_templates import AUTO
from sgtv_jax.pipeline.config import ConfigError, MergeConfig, TokenizerSpec, TokenSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str | Path) -> Any:
    """The `transformers` tokenizer of model directory `path` (its contained files only), or None when it has none."""
    return load_local_tokenizer(path) if _has_tokenizer(path) else None


def _has_tokenizer(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


@dataclasses.dataclass(frozen=True)
class VocabMap:
    """The output vocabulary and, per checkpoint (0 the base, t + 1 model t), where its rows come from.

    vocab: output token -> id; size: output rows (>= len(vocab), padding);
    perms[m]: `[len(vocab)]` int, checkpoint m's row of each output token, -1
    where it lacks it; vocabs[m]: checkpoint m's own token -> row;
    tokens: configured token sources, `model` resolved to a checkpoint index;
    tokenizer: the tokenizer to save (None: the base's files as they are).
    """

    vocab: dict[str, int]
    size: int
    perms: tuple[np.ndarray, ...]
    vocabs: tuple[dict[str, int], ...]
    tokens: dict[str, tuple[TokenSource, int]]
    tokenizer: Any
    added: tuple[str, ...]
    assumed_base: tuple[str, ...]

    def report(self) -> dict[str, Any]:
        return {
            "vocab_size": self.size,
            "tokens": len(self.vocab),
            "added": list(self.added),
            "models_without_tokenizer": list(self.assumed_base),
        }


def _union(base_tok: Any, toks: Sequence[Any], sizes: Sequence[int]) -> tuple[list[str], list[Any]]:
    """(ordinary tokens the base lacks, added tokens of any model), in order of model then id."""
    base_vocab = base_tok.get_vocab()
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in zip(toks, sizes):
        decoder = tok.added_tokens_decoder
        specials = {info.content for info in decoder.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in specials and t not in base_vocab:
                plain.setdefault(t)
        for i, info in sorted(decoder.items()):
            if i < size and info.content not in base_vocab:
                added.setdefault(info.content, info)
    return list(plain), list(added.values())


def _tokenizer_file(directory: str) -> Path:
    """The file a folder's tokenizer mostly comes from, for messages."""
    d = Path(directory)
    return next((d / f for f in TOKENIZER_FILES if (d / f).is_file()), d)


def _one_id_per_token(vocab: Mapping[str, int], where: str) -> None:
    """ConfigError unless `vocab`'s ids are 0..n-1, one token each: ids index the embedding rows."""
    seen: dict[int, str] = {}
    for t, i in vocab.items():
        if i in seen:
            raise ConfigError(
                f"{where}: tokens {seen[i]!r} and {t!r} have the same id {i}; "
                "each token needs an id of its own (its embedding row)"
            )
        seen[i] = t
        if not 0 <= i < len(vocab):
            raise ConfigError(
                f"{where}: token {t!r} has id {i}, outside 0..{len(vocab) - 1}: the ids must number the tokens"
            )


def _load_shared(paths: Sequence[str]) -> list[Any]:
    """Each folder's tokenizer (None: it has no tokenizer files), folders with the same files sharing one.

    Fine-tunes usually carry their base's tokenizer files; each distinct set is
    parsed once (transformers takes seconds per load), so the objects returned are
    shared and must not be changed (`_output_tokenizer` extends a fresh copy).
    """
    by_digest: dict[str, Any] = {}
    out: list[Any] = []
    for p in paths:
        if not _has_tokenizer(p):
            out.append(None)
            continue
        key = tokenizer_digest(p)
        if key not in by_digest:
            by_digest[key] = load_local_tokenizer(p)
        out.append(by_digest[key])
    return out


def _read_tokenizers(
    paths: Sequence[str], configs: Sequence[Mapping[str, Any]], labels: Sequence[str]
) -> tuple[Any, list[Any], list[str], list[int]]:
    """(the base's tokenizer, each checkpoint's, labels of those taking the base's, each one's row count).

    A checkpoint without tokenizer files has the base's; ConfigError when the
    base has none or tokens past its config's `vocab_size`.
    """
    loaded = _load_shared(paths)
    base_tok = loaded[0]
    if base_tok is None:
        raise ConfigError(f"{labels[0]}: tokenizer_source / tokenizer need the base model's tokenizer files")
    assumed = [lab for t, lab in zip(loaded, labels) if t is None]
    toks = [t if t is not None else base_tok for t in loaded]
    sizes = [vocab_size_of(dict(c)) or len(t.get_vocab()) for c, t in zip(configs, toks)]
    beyond = [t for t, i in base_tok.get_vocab().items() if i >= sizes[0]]
    if beyond:
        raise ConfigError(
            f"{labels[0]}: its tokenizer has {len(beyond)} token(s) past the config's vocab_size {sizes[0]} "
            f"(e.g. {beyond[0]!r}): they have no embedding row"
        )
    return base_tok, toks, assumed, sizes


def _output_tokenizer(
    spec: TokenizerSpec, paths: Sequence[str], base_tok: Any, toks: Sequence[Any], sizes: Sequence[int]
) -> tuple[Any, bool]:
    """(the output tokenizer of `spec`, whether it differs from the base's files), its named tokens added."""
    changed = False
    if spec.source == "union":
        out_tok = load_local_tokenizer(paths[0])  # a fresh copy to extend
        plain, added = _union(base_tok, toks, sizes)
        if plain:
            out_tok.add_tokens(plain)
        for info in added:
            out_tok.add_tokens([info], special_tokens=bool(getattr(info, "special", False)))
        changed = bool(plain or added)
    elif spec.source == "base":
        out_tok = base_tok
    else:
        out_tok = load_tokenizer(spec.source)
        if out_tok is None:
            raise ConfigError(f"tokenizer source {spec.written}: no tokenizer files in {spec.source}")
        changed = True
    missing = [t for t in spec.tokens if t not in out_tok.get_vocab()]
    if missing:
        if out_tok is base_tok:  # shared with the checkpoints' row maps (`_load_shared`): extend a copy
            out_tok = load_local_tokenizer(paths[0])
        out_tok.add_tokens(missing)
        changed = True
    return out_tok, changed


def _row_maps(
    vocab: Mapping[str, int], toks: Sequence[Any], sizes: Sequence[int]
) -> tuple[list[np.ndarray], list[dict[str, int]]]:
    """(per checkpoint `[len(vocab)]` its row of each output token or -1, its own token -> row)."""
    perms = []
    vocabs = []
    for tok, vs in zip(toks, sizes):
        own = tok.get_vocab()
        vocabs.append(dict(own))
        perm = np.full(len(vocab), -1, np.int64)
        for t, i in vocab.items():
            j = own.get(t)
            if j is not None and j < vs:
                perm[i] = j
        perms.append(perm)
    return perms, vocabs


def _token_sources(spec: TokenizerSpec, paths: Sequence[str]) -> dict[str, tuple[TokenSource, int]]:
    """`tokenizer.tokens` with each named model resolved to its checkpoint index (-1: none named)."""
    tokens = {}
    for t, ts in spec.tokens.items():
        m = -1
        if ts.kind in ("model", "model_token"):
            m = next((k for k, p in enumerate(paths) if Path(p) == Path(ts.model)), -1)
            if m < 0:
                raise ConfigError(
                    f"tokenizer.tokens[{t!r}]: model {ts.written or ts.model} is not one of the merged models"
                )
        tokens[t] = (ts, m)
    return tokens


def build_vocab(cfg: MergeConfig, paths: Sequence[str], configs: Sequence[Mapping[str, Any]], labels: Sequence[str]):
    """The `VocabMap` of a config's tokenizer spec over checkpoints `paths` (0 the base), or None.

    None: the output vocabulary is the base's and every model's rows already
    match it (nothing to re-index). `configs`: each checkpoint's config.json
    (its `vocab_size` bounds its rows); `labels` name them in messages.
    """
    spec = cfg.tokenizer
    if spec is None:
        return None
    base_tok, toks, assumed, sizes = _read_tokenizers(paths, configs, labels)
    out_tok, changed = _output_tokenizer(spec, paths, base_tok, toks, sizes)
    vocab = dict(sorted(out_tok.get_vocab().items(), key=lambda kv: kv[1]))  # by id (get_vocab: any order)
    src, who = (
        (paths[0], labels[0]) if spec.source in ("union", "base") else (spec.source, f"tokenizer source {spec.written}")
    )
    _one_id_per_token(vocab, f"{who}: {_tokenizer_file(src)}")
    n = len(vocab)
    pad = spec.pad_to_multiple_of
    size = n if not pad or n % pad == 0 else n + pad - n % pad
    perms, vocabs = _row_maps(vocab, toks, sizes)
    tokens = _token_sources(spec, paths)
    identity = (
        not changed
        and not tokens
        and size == n
        and all(len(p) == vs and np.array_equal(p, np.arange(vs)) for p, vs in zip(perms, sizes))
    )
    if identity:
        return None
    base_vocab = base_tok.get_vocab()
    return VocabMap(
        vocab=vocab,
        size=size,
        perms=tuple(perms),
        vocabs=tuple(vocabs),
        tokens=tokens,
        tokenizer=out_tok if changed else None,
        added=tuple(sorted((t for t in vocab if t not in base_vocab), key=vocab.__getitem__)),
        assumed_base=tuple(assumed),
    )


@dataclasses.dataclass
class FillLog:
    """What the re-indexing filled: tokens no participant had, rows filled per checkpoint."""

    no_source: dict[str, None] = dataclasses.field(default_factory=dict)
    filled: dict[int, int] = dataclasses.field(default_factory=dict)


def permute_rows(
    vm: VocabMap, rows: Mapping[int, np.ndarray], base: int | None, log: FillLog | None = None
) -> dict[int, np.ndarray]:
    """Each checkpoint's vocabulary-indexed tensor `rows[m]` `[its vocab, ...]` re-indexed to `[vm.size, ...]`.

    `rows`: the participants of one output tensor (checkpoint index -> its
    stored tensor); `base`: the checkpoint whose row a shared token takes when
    some participant lacks it (None: the mean). Float32 out.
    """
    ms = list(rows)
    n = len(vm.vocab)
    tail = next(iter(rows.values())).shape[1:]
    src = {m: np.asarray(rows[m], np.float32) for m in ms}
    has = np.stack([vm.perms[m] >= 0 for m in ms])  # [P, n]
    count = has.sum(0)
    fill = np.zeros((n,) + tail, np.float64)
    # mean of the rows of the participants having the token; one having it: its row
    for k, m in enumerate(ms):
        idx = np.nonzero(has[k])[0]
        fill[idx] += src[m][vm.perms[m][idx]]
    fill[count > 0] /= count[count > 0].reshape((-1,) + (1,) * len(tail))
    fill = fill.astype(np.float32)
    if base is not None and base in src:
        b = ms.index(base)
        idx = np.nonzero(has[b])[0]
        fill[idx] = src[base][vm.perms[base][idx]]
    force = np.zeros(n, bool)
    for t, (ts, m) in vm.tokens.items():
        i = vm.vocab[t]
        force[i] = ts.force
        if ts.kind == "zero":
            fill[i] = 0
        elif ts.kind == "model":
            if m not in src or vm.perms[m][i] < 0:
                raise ConfigError(
                    f"tokenizer.tokens[{t!r}]: its source model ({ts.written or ts.model}) "
                    + ("does not have this token" if m in src else "is not read for this tensor")
                )
            fill[i] = src[m][vm.perms[m][i]]
        elif ts.kind == "model_token":
            j = ts.token_id if ts.token_id is not None else vm.vocabs[m].get(str(ts.token), -1)
            if m not in src or not 0 <= j < src[m].shape[0]:
                raise ConfigError(
                    f"tokenizer.tokens[{t!r}]: token {ts.token if ts.token is not None else ts.token_id!r} "
                    f"is not a row of {ts.written or ts.model}"
                )
            fill[i] = src[m][j]
    configured = np.zeros(n, bool)
    for t in vm.tokens:
        configured[vm.vocab[t]] = vm.tokens[t][0].kind != "default"
    if log is not None:
        inv = {i: t for t, i in vm.vocab.items()}
        for row in np.nonzero((count == 0) & ~configured)[0]:
            log.no_source.setdefault(inv[int(row)])
    out = {}
    for k, m in enumerate(ms):
        own = has[k] & ~force
        arr = np.empty((vm.size,) + tail, np.float32)
        arr[:n] = fill
        idx = np.nonzero(own)[0]
        arr[idx] = src[m][vm.perms[m][idx]]
        if vm.size > n:  # padding rows: the mean of the token rows
            arr[n:] = arr[:n].mean(0)
        if log is not None:
            log.filled[m] = log.filled.get(m, 0) + int(n - own.sum())
        out[m] = arr
    return out


def model_templates(paths: Sequence[str]) -> list[str]:
    """The chat templates the models' directories carry (chat_template.jinja, else tokenizer_config.json).

    Read inside each directory only (`convert.containment`); ConvertError
    naming the file when one leaves it, is not UTF-8 or not JSON.
    """
    found = []
    for p in paths:
        d = Path(p)
        text = None
        if (d / "chat_template.jinja").is_file():
            text = read_contained_text(d, "chat_template.jinja", what="chat_template: auto")
        elif (d / "tokenizer_config.json").is_file():
            data = read_contained_json(d, "tokenizer_config.json", what="chat_template: auto")
            t = data.get("chat_template") if isinstance(data, dict) else None
            text = t.get("default") if isinstance(t, dict) else t
        if isinstance(text, str) and text.strip():
            found.append(text.strip())
    return found


def output_chat_template(cfg: MergeConfig, *, saves_tokenizer: bool = False) -> str | None:
    """The Jinja text `chat_template` gives the output (None: none), checked before any work.

    `auto` reads the models' templates now (`model_templates`), so a bad file
    is refused before the merge. The template goes into the output's
    tokenizer_config.json, which is the base's copy unless the merge saves a
    tokenizer of its own (`saves_tokenizer`: a changed vocabulary); so a base
    without one is refused here rather than after the merge (we do not invent
    a tokenizer config).
    """
    template = cfg.chat_template
    if template == AUTO:
        found = model_templates([cfg.base_model] + [m.model for m in cfg.models])
        template = Counter(found).most_common(1)[0][0] if found else None
    if template is None:
        return None
    if saves_tokenizer:
        return template
    base = Path(cfg.base_model)
    if not (base / "tokenizer_config.json").is_file():
        raise ConfigError(
            f"chat_template: {Path(cfg.base_model_written or cfg.base_model) / 'tokenizer_config.json'} does not "
            "exist, and the output's tokenizer_config.json, which holds the template, is a copy of it; give the "
            "base model its tokenizer files or drop chat_template"
        )
    if not isinstance(read_contained_json(base, "tokenizer_config.json", what="chat_template"), dict):
        raise ConfigError(f"{base / 'tokenizer_config.json'}: must hold a JSON object (chat_template goes into it)")
    return template


def write_tokenizer_files(vm: VocabMap | None, out: Path, template: str | None) -> None:
    """Save the output tokenizer (when it differs from the base's copied files) and the chat template into `out`.

    `template`: `output_chat_template`'s text (None: left as copied). It is
    written into tokenizer_config.json (and over a chat_template.jinja copied
    from the base, which loaders prefer).
    """
    if vm is not None and vm.tokenizer is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            (out / f).unlink(missing_ok=True)
        vm.tokenizer.save_pretrained(str(out))
    if template is None:
        return
    tc = out / "tokenizer_config.json"  # our own output: the base's copy (contained) or the tokenizer just saved
    if not tc.is_file():  # output_chat_template refused this before the merge
        raise ConfigError("chat_template needs a tokenizer: the base model has no tokenizer_config.json")
    data = json.loads(tc.read_text())
    data["chat_template"] = template
    tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(template)
    (out / "chat_template.json").unlink(missing_ok=True)
