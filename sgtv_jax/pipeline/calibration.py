"""Calibration data: text / JSONL files -> token windows `[N, S]` with padding masks.

* ``.txt`` (any other suffix too): the whole file is one document.
* ``.jsonl``: one JSON object per line; the document is ``record[text_field]``
  (default ``"text"``), or ``prompt + answer`` when the record has those.

Documents are tokenised with the base model's tokenizer and joined with its
EOS token into one stream; `nsamples` windows of `seqlen` tokens start at
positions drawn with `numpy.random.default_rng(seed)` (SparseGPT's recipe).
A stream shorter than `seqlen` gives one right-padded window whose padding
is masked (`mask = 0`); padding never enters a Hessian.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from convert.local_tokenizer import load_local_tokenizer
from sgtv_jax.errors import SgtvError


class CalibrationError(SgtvError):
    """Missing, empty or unusable calibration data (names the file)."""


class CalibrationSet(NamedTuple):
    """Token windows and their masks.

    input_ids: int32 `[N, S]`; mask: int32 `[N, S]` (1 = real token, 0 = padding).
    """

    input_ids: np.ndarray
    mask: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; `CalibrationError` naming the file and offset if it is not UTF-8."""
    p = Path(path)
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def jsonl_records(path: Path, text: str, error: type[SgtvError]) -> Iterator[tuple[int, Any]]:
    """`(line number, record)` of each non-blank line of the JSONL `text` read from `path`.

    A line that is not JSON raises `error` naming the file and line (the caller's error class).
    """
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{ln}: not valid JSON ({e})") from None
        yield ln, rec


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of one calibration file; raises `CalibrationError` if missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file {p} does not exist")
    text = read_text(p)
    if p.suffix == ".jsonl":
        docs = []
        for ln, rec in jsonl_records(p, text, CalibrationError):
            if isinstance(rec, dict) and text_field in rec:
                docs.append(str(rec[text_field]))
            elif isinstance(rec, dict) and "prompt" in rec and "answer" in rec:
                docs.append(str(rec["prompt"]) + str(rec["answer"]))
            else:
                raise CalibrationError(f"{p}:{ln}: record has no {text_field!r} field (nor prompt/answer)")
    else:
        docs = [text]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"calibration file {p} is empty")
    return docs


def load_tokenizer(model_dir: str | Path) -> Any:
    """The base model's tokenizer (its contained local files only: `convert.local_tokenizer`)."""
    return load_local_tokenizer(model_dir)


def token_stream(files: Sequence[str | Path], tokenizer: Any, text_field: str = "text") -> np.ndarray:
    """All documents of `files`, tokenised (no special tokens) and joined by EOS; int32 `[n]`."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for f in files:
        for doc in read_documents(f, text_field):
            ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(int(eos))
    if not ids:
        raise CalibrationError(f"calibration files {[str(f) for f in files]} give no tokens")
    return np.asarray(ids, np.int32)


def windows(stream: np.ndarray, nsamples: int, seqlen: int, seed: int, pad_id: int = 0) -> CalibrationSet:
    """`nsamples` windows of `seqlen` tokens at seeded random starts (padded when the stream is short)."""
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"nsamples and seqlen must be >= 1, got {nsamples}, {seqlen}")
    n = len(stream)
    if n <= seqlen:
        ids = np.full((1, seqlen), pad_id, np.int32)
        mask = np.zeros((1, seqlen), np.int32)
        ids[0, :n], mask[0, :n] = stream, 1
        return CalibrationSet(ids, mask)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - seqlen + 1, size=nsamples)
    ids = np.stack([stream[s : s + seqlen] for s in starts]).astype(np.int32)
    return CalibrationSet(ids, np.ones_like(ids))


def load_calibration(calib: Any, tokenizer: Any, max_positions: int | None = None) -> CalibrationSet:
    """Windows for a `config.CalibrationConfig`; checks `seqlen` against the model's maximum."""
    if max_positions is not None and calib.seqlen > max_positions:
        raise CalibrationError(
            f"calibration seqlen {calib.seqlen} exceeds the model's maximum of {max_positions} positions"
        )
    stream = token_stream(calib.data, tokenizer, calib.text_field)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return windows(stream, calib.nsamples, calib.seqlen, calib.seed, int(pad))


def check_files(files: Sequence[str | Path], text_field: str = "text") -> None:
    """Cheap check that every calibration file exists and has a document (no tokenising)."""
    for f in files:
        read_documents(f, text_field)
