"""The read-side interface every checkpoint reader implements.

A checkpoint is a set of named tensors in Hugging Face naming (``model.layers.0.
self_attn.q_proj.weight``, PyTorch ``[out, in]`` layout) plus the model's config
as a plain dict (the content of ``config.json``). Readers load one tensor at a
time so that a model never has to sit in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np


@runtime_checkable
class Checkpoint(Protocol):
    """Lazy, read-only view of a checkpoint's tensors and config."""

    path: Path

    @property
    def config(self) -> dict[str, Any]:
        """The Hugging Face config as a dict (``model_type`` included)."""
        ...

    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard)."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor without reading its data."""
        ...

    def dtype(self, name: str) -> np.dtype:
        """Stored dtype of one tensor without reading its data."""
        ...

    def get(self, name: str) -> np.ndarray:
        """Read one tensor (a fresh array the caller owns)."""
        ...

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, array)`` in storage order, one tensor in memory at a time."""
        ...

    def __contains__(self, name: object) -> bool: ...

    def __len__(self) -> int: ...

    def close(self) -> None:
        """Release file handles / maps."""
        ...

    def __enter__(self) -> Self:
        """A checkpoint is a context manager that calls ``close()`` on exit."""
        ...

    def __exit__(self, *exc: object) -> None: ...


class IndexedReader:
    """What readers that map each tensor name to its file (``_where``) share: names, membership, size, ``with``."""

    _where: dict[str, Path]  # tensor name -> the file holding it

    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard)."""
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LazyTensors(Mapping):
    """A read-only ``Mapping[name, np.ndarray]`` that reads each tensor on access.

    Lets whole-model loaders that take a dict consume a checkpoint without
    holding all of it at once (each lookup is a fresh read).
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self._ckpt = ckpt

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._ckpt:
            raise KeyError(name)
        return self._ckpt.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ckpt.names())

    def __len__(self) -> int:
        return len(self._ckpt)

    def __contains__(self, name: object) -> bool:
        return name in self._ckpt
