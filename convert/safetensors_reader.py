"""Hugging Face safetensors checkpoints: one ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``, read lazily tensor by tensor."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from convert.checkpoint import IndexedReader
from convert.containment import contained_file
from convert.errors import ConvertError
from convert.model_config import check_model_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tags -> numpy dtypes (bf16 via ml_dtypes, as safe_open returns).
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _np_dtype(tag: str) -> np.dtype:
    name = _ST_DTYPES.get(tag)
    if name is None:
        raise ConvertError(f"unsupported safetensors dtype {tag}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def read_config(directory: Path) -> dict[str, Any]:
    """Load ``config.json`` from a model directory as a dict."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{path}: missing config.json (needed to know the architecture)")
    # Its content is copied into outputs: it may not come from outside the model directory.
    contained_file(directory, "config.json", what="config.json")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:  # invalid JSON or not UTF-8
        raise ConvertError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: must hold a JSON object, got a JSON {type(config).__name__}")
    check_model_config(config, str(path))  # sizes and counts: a head count of 0 fails here, by name
    return config


class SafetensorsCheckpoint(IndexedReader):
    """Lazy reader over a directory of safetensors shards.

    On open it validates the whole layout without reading tensor data: the index
    parses, every shard it names exists, every shard's header parses and its data
    section is complete (safetensors refuses truncated files), and the index and
    the headers agree on which tensor lives where.

    Tensor data is read with plain ``readinto`` at the offsets the header gives
    (no memory map), so reading a tensor costs exactly that tensor's bytes and
    nothing of the shard stays resident afterwards.
    """

    def __init__(self, directory: str | Path, *, single_file: str = SINGLE_FILE) -> None:
        # `single_file`: another file name read the same way (a PEFT adapter's
        # adapter_model.safetensors); an index is then not looked for.
        self.path = Path(directory)
        if not self.path.is_dir():
            raise ConvertError(f"{self.path}: not a directory")
        self._config: dict[str, Any] | None = None
        self._where: dict[str, Path] = {}  # tensor name -> shard file
        self._offsets: dict[str, tuple[int, int]] = {}  # absolute [begin, end) in the file
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.shards: list[Path] = []
        self.metadata: dict[str, str] = {}
        index = self.path / INDEX_FILE
        single = self.path / single_file
        if single_file == SINGLE_FILE and index.is_file():
            self._open_index(index)
        elif single.is_file():
            contained_file(self.path, single_file, what=single_file)
            self.shards = [single]
            self._scan_shard(single, expected=None)
        else:
            want = f"neither {SINGLE_FILE} nor {INDEX_FILE}" if single_file == SINGLE_FILE else f"no {single_file}"
            raise ConvertError(f"{self.path}: {want} found")
        self._open_file: Path | None = None
        self._handle: Any = None

    # -- validation -----------------------------------------------------------

    def _open_index(self, index: Path) -> None:
        contained_file(self.path, index.name, what=index.name)
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConvertError(f"{index}: not a valid safetensors index ({e!r})") from None
        by_file: dict[str, set[str]] = {}
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{index}: not a valid safetensors index (weight_map is not a mapping)")
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or fname not in by_file:
                # A shard name may not leave the directory (../x, /abs, a symlink out of it).
                contained_file(self.path, fname, what=f"{index}: shard {fname!r} (holding {name!r})")
            by_file.setdefault(fname, set()).add(name)
        for fname in sorted(by_file):
            shard = self.path / fname
            if not shard.is_file():
                raise ConvertError(
                    f"{shard}: shard named in {index.name} is missing (it should hold e.g. {sorted(by_file[fname])[0]})"
                )
            self.shards.append(shard)
            self._scan_shard(shard, expected=by_file[fname])

    def _scan_shard(self, shard: Path, expected: set[str] | None) -> None:
        try:
            with safe_open(str(shard), framework="numpy") as f:
                keys = list(f.keys())
                meta = f.metadata() or {}
                for k in keys:
                    sl = f.get_slice(k)
                    self._shapes[k] = tuple(int(d) for d in sl.get_shape())
                    self._dtypes[k] = _np_dtype(sl.get_dtype())
        except SafetensorError as e:
            raise ConvertError(f"{shard}: truncated or corrupt safetensors file ({e})") from None
        # safe_open has validated the header and that the data covers it; take the
        # offsets from the header so reads need no memory map.
        with open(shard, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k in keys:
            begin, end = header[k]["data_offsets"]
            self._offsets[k] = (8 + n + int(begin), 8 + n + int(end))
        self.metadata.update(meta)
        if expected is not None:
            missing = expected - set(keys)
            if missing:
                raise ConvertError(
                    f"{shard}: the index says it holds {sorted(missing)[0]!r} "
                    f"({len(missing)} tensor(s) in all) but the file does not"
                )
            # Tensors present in a shard but absent from the index are ignored by
            # transformers; we ignore them too rather than invent a location.
            keys = [k for k in keys if k in expected]
        for k in keys:
            if k in self._where:
                raise ConvertError(f"{shard}: tensor {k!r} also stored in {self._where[k]}")
            self._where[k] = shard

    # -- Checkpoint interface -------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            self._config = read_config(self.path)
        return self._config

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._check(name)]

    def dtype(self, name: str) -> np.dtype:
        return self._dtypes[self._check(name)]

    def shard_of(self, name: str) -> Path:
        """The file holding ``name``."""
        return self._where[self._check(name)]

    def _check(self, name: str) -> str:
        if name not in self._where:
            raise ConvertError(f"{self.path}: no tensor named {name!r}")
        return name

    def _handle_for(self, shard: Path) -> Any:
        # One open file at a time, reused while reading consecutive tensors of it.
        if self._open_file != shard:
            self.close()
            self._handle = open(shard, "rb")
            self._open_file = shard
        return self._handle

    def get(self, name: str) -> np.ndarray:
        shard = self.shard_of(name)
        begin, end = self._offsets[name]
        arr = np.empty(self._shapes[name], dtype=self._dtypes[name])
        if arr.nbytes != end - begin:
            raise ConvertError(f"{shard}: tensor {name!r} spans {end - begin} bytes, its shape/dtype need {arr.nbytes}")
        fh = self._handle_for(shard)
        fh.seek(begin)
        got = fh.readinto(arr.reshape(-1).view(np.uint8).data)
        if got != arr.nbytes:
            raise ConvertError(f"{shard}: truncated while reading tensor {name!r} ({got} of {arr.nbytes} bytes)")
        return arr

    def get_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of tensor ``name`` (along its first axis), reading only their bytes.

        Row-major storage makes a row range one contiguous byte range, so this
        costs ``(r1 - r0) / rows`` of ``get(name)``. A 0-d tensor has no rows.
        """
        shard = self.shard_of(name)
        shape = self._shapes[name]
        if not shape:
            raise ConvertError(f"{shard}: tensor {name!r} is a scalar; it has no rows to read")
        if not 0 <= r0 <= r1 <= shape[0]:
            raise ConvertError(f"{shard}: rows [{r0}, {r1}) of tensor {name!r} are outside its {shape[0]} rows")
        begin, end = self._offsets[name]
        arr = np.empty((r1 - r0,) + shape[1:], dtype=self._dtypes[name])
        row_bytes = arr.nbytes // max(r1 - r0, 1) if r1 > r0 else 0
        if r1 > r0 and begin + r1 * row_bytes > end:
            raise ConvertError(f"{shard}: tensor {name!r} spans {end - begin} bytes, too few for its shape")
        fh = self._handle_for(shard)
        fh.seek(begin + r0 * row_bytes)
        got = fh.readinto(arr.reshape(-1).view(np.uint8).data)
        if got != arr.nbytes:
            raise ConvertError(
                f"{shard}: truncated while reading rows of tensor {name!r} ({got} of {arr.nbytes} bytes)"
            )
        return arr

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names():
            yield name, self.get(name)

    def nbytes(self) -> int:
        """Total tensor bytes (what the index calls total_size)."""
        return sum(int(np.prod(s, dtype=np.int64)) * self._dtypes[n].itemsize for n, s in self._shapes.items())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._open_file = None

    def __repr__(self) -> str:
        return f"SafetensorsCheckpoint({str(self.path)!r}, {len(self)} tensors, {len(self.shards)} shard(s))"
