"""Write (merged) parameters as a Hugging Face model directory.

Output: sharded safetensors (``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json``, or one ``model.safetensors``), ``config.json``
from the base with ``dtype`` set, the base's tokenizer files and
``generation_config.json``, and a README model card.

Everything is written into a temporary directory beside the destination and
renamed into place only at the end (``convert.atomic``), so an interrupted or
failed export never leaves a complete-looking model behind, and an existing
destination is replaced only if it is a previous output of this tool.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from convert.atomic import atomic_output, labelled_inputs
from convert.checkpoint import Checkpoint
from convert.chunked import ChunkedTensor, ChunkError, rows_of
from convert.containment import contained_file
from convert.dtypes import config_dtype_name, count_nonfinite, is_float, parse_dtype
from convert.errors import ConvertError
from convert.model_card import render_model_card
from convert.safetensors_writer import StreamingSafetensorsWriter
from sgtv_jax.numparse import show, size_problem

INDEX_FILE = "model.safetensors.index.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
SINGLE_FILE = "model.safetensors"
COPY_CHUNK_BYTES = 64 << 20
"""Base tensors larger than this are copied in row chunks of about this size."""

# Files copied verbatim from the base (or tokenizer) directory when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class _Unchanged:
    """Marker: take this tensor from the base checkpoint as stored."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()


def parse_size(size: int | str) -> int:
    """'5GB' -> 5*10**9 bytes, '500MiB' -> 500*2**20 (transformers' convention); the rules of
    `sgtv_jax.numparse.size_problem` (finite, positive, at most int64 bytes)."""
    total, why = size_problem(size)
    if why is not None:
        raise ConvertError(f"size {show(size)} {why} (use e.g. 500MB, 2GB, 1GiB)")
    return total


def _items(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    if isinstance(tensors, Mapping):
        # Look values up lazily so a lazy Mapping is only read one tensor at a time.
        for k in tensors:
            yield k, tensors[k]
    else:
        yield from tensors


def _prepare(name: str, value: Any, out_dtype: np.dtype, base: Checkpoint | None) -> np.ndarray | ChunkedTensor:
    """Resolve one tensor to what we write (cast, checked): an array, or a ChunkedTensor checked chunk by chunk."""
    if value is UNCHANGED:
        if base is None or name not in base:
            raise ConvertError(f"tensor {name!r} is marked UNCHANGED but the base has no such tensor")
        arr = _base_tensor(base, name)
    elif isinstance(value, ChunkedTensor):
        arr = value
    else:
        arr = np.asarray(value)
    if base is not None and name in base and tuple(arr.shape) != tuple(base.shape(name)):
        raise ConvertError(f"tensor {name!r} has shape {tuple(arr.shape)} but the base has {tuple(base.shape(name))}")
    if isinstance(arr, ChunkedTensor):
        dtype = out_dtype if is_float(arr.dtype) else arr.dtype
        return arr.map(lambda c: _checked(name, c, out_dtype), dtype)
    return _checked(name, arr, out_dtype)


def _base_tensor(base: Checkpoint, name: str) -> np.ndarray | ChunkedTensor:
    """A base tensor to copy: read in row chunks when the checkpoint can and it is large."""
    shape = tuple(base.shape(name))
    get_rows = getattr(base, "get_rows", None)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * base.dtype(name).itemsize if shape else 0
    if get_rows is None or not shape or row_bytes * shape[0] <= COPY_CHUNK_BYTES:
        return base.get(name)
    rows = max(1, COPY_CHUNK_BYTES // max(row_bytes, 1))
    return rows_of(lambda r0, r1: get_rows(name, r0, r1), shape, base.dtype(name), rows)


def _checked(name: str, arr: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """`arr` cast to `out_dtype` when floating, refused (by name) if it then holds NaN / Inf."""
    if is_float(arr.dtype):
        if arr.dtype != out_dtype:
            # Casting a finite fp32 value to bf16/fp16 can overflow to inf; check
            # after the cast so such a tensor is refused too.
            with np.errstate(over="ignore"):  # overflow is reported below, by name
                arr = arr.astype(out_dtype)
        bad = count_nonfinite(arr)
        if bad:
            raise ConvertError(
                f"tensor {name!r} has {bad} non-finite value(s) (NaN/Inf) in {arr.dtype}; refusing to write it"
            )
    # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


class _ShardWriter:
    """Streams tensors into shards of at most ``max_bytes`` (unless one tensor is larger).

    Each tensor is written to disk as it arrives (see StreamingSafetensorsWriter),
    so export holds one tensor (one chunk of a ChunkedTensor) in memory, not one shard. Shards are written as
    ``shard-<i>.tmp`` and renamed once their count is known.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.current: StreamingSafetensorsWriter | None = None
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, arr: np.ndarray | ChunkedTensor) -> None:
        if self.current is not None and len(self.current) and self.current.nbytes + arr.nbytes > self.max_bytes:
            self.flush()
        if self.current is None:
            path = self.directory / f"shard-{len(self.files):05d}.tmp"
            self.current = StreamingSafetensorsWriter(path, metadata={"format": "pt"})
        try:
            self.current.add(name, arr)
        except ChunkError as e:
            raise ConvertError(f"tensor {name!r}: {e}") from None
        self.total += arr.nbytes

    def flush(self) -> None:
        if self.current is None:
            return
        path = self.current.close()
        os.chmod(path, 0o666 & ~_UMASK)
        self.files.append((path, self.current.names()))
        self.current = None

    def finish(self) -> list[str]:
        """Rename shards to their final names and write the index; return file names."""
        self.flush()
        n = len(self.files)
        if n == 0:
            raise ConvertError("no tensors to export")
        if n == 1:
            self.files[0][0].rename(self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map: dict[str, str] = {}
        names = []
        for i, (path, tensor_names) in enumerate(self.files):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / fname)
            names.append(fname)
            weight_map.update({t: fname for t in tensor_names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def _with_base(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    base: Checkpoint | None,
    fill_from_base: bool,
    tied: bool,
) -> Iterator[tuple[str, Any]]:
    """The input tensors, checked against the base, then the base's untouched ones."""
    seen: set[str] = set()
    for name, value in _items(tensors):
        if name in seen:
            raise ConvertError(f"tensor {name!r} given twice")
        if base is not None and name not in base:
            if tied and name == "lm_head.weight":
                continue  # tied head: HF checkpoints store only the embedding
            raise ConvertError(f"tensor {name!r} is not in the base checkpoint {base.path}")
        seen.add(name)
        yield name, value
    if base is not None and fill_from_base:
        for name in base.names():
            if name not in seen:
                yield name, UNCHANGED


def copy_model_files(src: str | Path, dst: Path) -> list[str]:
    """Copy the TOKENIZER_FILES that ``src`` has into ``dst``; returns their names.

    Each must resolve inside ``src`` (a HF cache snapshot's links into its own
    blob store are fine; see ``convert.containment``); an allowed symlink is
    copied as a regular file with its target's bytes. A name that points
    elsewhere raises ConvertError naming it.
    """
    copied = []
    for fname, real in model_files(src).items():
        shutil.copyfile(real, dst / fname)
        copied.append(fname)
    return copied


def model_files(src: str | Path) -> dict[str, Path]:
    """The TOKENIZER_FILES that ``src`` has -> their real paths (each checked: see `copy_model_files`)."""
    return {
        fname: contained_file(src, fname, what=f"{fname} (copied into the output)")
        for fname in TOKENIZER_FILES
        if (Path(src) / fname).is_file()
    }


def _protected(
    inputs: Mapping[str, str | Path] | Iterable[str | Path], base: Checkpoint | None, copy_files_from: str | Path | None
) -> dict[str, str]:
    """``label -> path`` the output may not overlap: `inputs`, then the base and the tokenizer source."""
    protected = dict(labelled_inputs(inputs))
    if base is not None:
        protected.setdefault("the base checkpoint", str(base.path))
    if copy_files_from is not None:
        protected.setdefault("the tokenizer source", str(copy_files_from))
    return protected


def _progress_bar(
    stream: Iterable[tuple[str, Any]],
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    base: Checkpoint | None,
    fill_from_base: bool,
    label: str,
) -> Iterable[tuple[str, Any]]:
    """`stream` under a tqdm bar whose total is the base's tensor count when filling from it, else the input's (if known)."""
    total = (
        len(base) if base is not None and fill_from_base else (len(tensors) if isinstance(tensors, Mapping) else None)
    )
    return tqdm(stream, desc=f"export {label}", unit="tensor", total=total)


def export_hf(
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    dst: str | Path,
    *,
    base: Checkpoint | None = None,
    config: Mapping[str, Any] | None = None,
    dtype: str | np.dtype = "bf16",
    max_shard_size: int | str = "5GB",
    copy_files_from: str | Path | None = None,
    model_card: Mapping[str, Any] | str | None = None,
    fill_from_base: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    finalize: Callable[[Path], None] | None = None,
    inputs: Mapping[str, str | Path] | Iterable[str | Path] = (),
) -> Path:
    """Export HF-named tensors to a Hugging Face directory at ``dst``.

    ``tensors`` maps HF names to arrays (numpy / jax, PyTorch layout), to
    ``convert.chunked.ChunkedTensor`` (written chunk by chunk, never whole) or to
    :data:`UNCHANGED`; it may be a lazy iterator of ``(name, value)`` pairs. With a
    ``base`` checkpoint, UNCHANGED tensors (and, if ``fill_from_base``, base tensors
    the input never names) are read from the base; when the base stores them in
    the output dtype their bytes are copied exactly (in row chunks of
    ``COPY_CHUNK_BYTES`` when the base reads rows). Floating tensors are cast to
    ``dtype`` ('bf16' / 'fp16' / 'fp32'); integer tensors keep their dtype.

    ``config`` defaults to the base's; ``copy_files_from`` (tokenizer files and
    generation config) defaults to the base's directory. ``model_card`` is a
    dict rendered into README.md (or a ready string). ``finalize(tmp_dir)`` may
    add files (e.g. a tokenizer) before the directory is renamed into place.
    Returns ``dst``.

    The directory is written by ``convert.atomic.atomic_output``: ``dst`` may
    not overlap the base, the copied-files directory or any of ``inputs``
    (paths or ``label -> path``); ``overwrite`` replaces only a previous output
    of this tool or an empty directory.

    Raises ConvertError (and leaves ``dst`` as it was) on a NaN/Inf tensor, a
    shape that disagrees with the base, a tokenizer file that resolves outside
    its directory, or an existing ``dst`` without ``overwrite``.
    """
    dst = Path(dst)
    out_dtype = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    if config is None:
        if base is None:
            raise ConvertError("export_hf needs a config (or a base checkpoint to take it from)")
        config = base.config
    cfg = json.loads(json.dumps(dict(config)))  # deep copy, and proof it is JSON-serialisable
    if copy_files_from is None and base is not None and Path(base.path).is_dir():
        copy_files_from = base.path
    protected = _protected(inputs, base, copy_files_from)

    with atomic_output(dst, kind="hf", overwrite=overwrite, inputs=protected) as tmp:
        if copy_files_from is not None:  # first: a file that escapes is refused before any tensor work
            copy_model_files(copy_files_from, tmp)
        writer = _ShardWriter(tmp, max_bytes)
        tied = bool(cfg.get("tie_word_embeddings", False))
        stream: Iterable[tuple[str, Any]] = _with_base(tensors, base, fill_from_base, tied)
        if progress:
            stream = _progress_bar(stream, tensors, base, fill_from_base, dst.name)
        for name, value in stream:
            writer.add(name, _prepare(name, value, out_dtype, base))
        writer.finish()

        cfg["dtype"] = config_dtype_name(out_dtype)
        if "torch_dtype" in cfg:  # transformers < 5 reads this spelling
            cfg["torch_dtype"] = cfg["dtype"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if model_card is not None:
            text = model_card if isinstance(model_card, str) else render_model_card(model_card, cfg)
            (tmp / "README.md").write_text(text)
        if finalize is not None:
            finalize(tmp)
    return dst
