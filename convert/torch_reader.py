"""PyTorch ``pytorch_model.bin`` checkpoints (single or sharded through
``pytorch_model.bin.index.json``), read with ``torch.load(weights_only=True)``.

These files are pickles. We never unpickle them any other way: without torch
the reader refuses with a clear error instead of falling back to ``pickle``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from convert.checkpoint import IndexedReader
from convert.containment import contained_file
from convert.errors import ConvertError
from convert.safetensors_reader import read_config

SINGLE_FILE = "pytorch_model.bin"
INDEX_FILE = "pytorch_model.bin.index.json"


def _import_torch(path: Path) -> Any:
    try:
        import torch  # noqa: PLC0415 (torch is optional: only .bin checkpoints need it)
    except ImportError:
        raise ConvertError(
            f"{path}: this is a pickled PyTorch checkpoint and reading it safely needs "
            "torch (torch.load(weights_only=True)); install torch (e.g. pip install "
            "torch==2.13.0) or convert the checkpoint to safetensors first"
        ) from None
    return torch


def torch_to_numpy(t: Any) -> np.ndarray:
    """A CPU torch tensor as a numpy array of the same dtype (bf16 -> ml_dtypes)."""
    import torch  # noqa: PLC0415 (torch is optional: only .bin checkpoints need it)

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        # numpy has no bf16; reinterpret the bits so no rounding happens.
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


class TorchBinCheckpoint(IndexedReader):
    """Reader over ``pytorch_model.bin`` (or its shards).

    A pickle shard can only be loaded whole, so random access holds one shard's
    tensors at a time (the last one read); iteration goes shard by shard.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            contained_file(self.path, INDEX_FILE, what=INDEX_FILE)
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: not a valid checkpoint index ({e!r})") from None
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{index}: not a valid checkpoint index (weight_map is not a mapping)")
            for n, f in weight_map.items():  # a shard name may not leave the directory
                contained_file(self.path, f, what=f"{index}: shard {f!r} (holding {n!r})")
            self._where = {n: self.path / f for n, f in weight_map.items()}
            for shard in dict.fromkeys(self._where.values()):
                if not shard.is_file():
                    raise ConvertError(f"{shard}: shard named in {INDEX_FILE} is missing")
        elif single.is_file():
            contained_file(self.path, SINGLE_FILE, what=SINGLE_FILE)
            self._where = {}
            self._single = single
        else:
            raise ConvertError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self._torch = _import_torch(index if index.is_file() else single)
        self._config: dict[str, Any] | None = None
        self._cache_file: Path | None = None
        self._cache: dict[str, np.ndarray] = {}
        if not self._where:
            # Names are only known after loading; a single file is one shard anyway.
            self._load(single)
            self._where = {n: single for n in self._cache}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, np.dtype] = {}

    def _load(self, shard: Path) -> dict[str, np.ndarray]:
        if self._cache_file != shard:
            self._cache = {}
            try:
                sd = self._torch.load(str(shard), map_location="cpu", weights_only=True, mmap=False)
            except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
                raise ConvertError(f"{shard}: cannot be loaded with torch.load(weights_only=True) ({e})") from None
            if not isinstance(sd, dict):
                raise ConvertError(f"{shard}: expected a state dict, found {type(sd).__name__}")
            self._cache = {k: torch_to_numpy(v) for k, v in sd.items()}
            self._cache_file = shard
        return self._cache

    @property
    def config(self) -> dict[str, Any]:
        if self._config is None:
            self._config = read_config(self.path)
        return self._config

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConvertError(f"{self.path}: no tensor named {name!r}")
        shard = self._where[name]
        tensors = self._load(shard)
        if name not in tensors:
            raise ConvertError(f"{shard}: the index says it holds {name!r} but it does not")
        return tensors[name].copy()

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            a = self.get(name)
            self._shapes[name], self._dtypes[name] = a.shape, a.dtype
        return self._shapes[name]

    def dtype(self, name: str) -> np.dtype:
        self.shape(name)
        return self._dtypes[name]

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        # Group by shard so each pickle is loaded once.
        order = sorted(self._where, key=lambda n: str(self._where[n]))
        for name in order:
            yield name, self.get(name)

    def close(self) -> None:
        self._cache, self._cache_file = {}, None
