"""A tensor given as consecutive row chunks, so writers never hold it whole.

`ChunkedTensor(shape, dtype, chunks)`: the shape and dtype are known up front
(what a safetensors header needs); `chunks` is any iterable of arrays
`[rows_i, *shape[1:]]` whose rows add up to `shape[0]`, read once, in order.
`export_hf` and `StreamingSafetensorsWriter` accept it wherever they accept an
array. `rows_of(read, shape, dtype, rows_per_chunk)` makes one from a row
reader `(r0, r1) -> array`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np


class ChunkError(ValueError):
    """Chunks that do not add up to the declared tensor."""


class ChunkedTensor:
    """A tensor of `shape` and `dtype` as an iterable of row chunks (iterate once)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[np.ndarray]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._chunks = chunks
        self._used = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __iter__(self) -> Iterator[np.ndarray]:
        """The chunks, checked: dtype, trailing shape, and rows adding up to `shape[0]`."""
        if self._used:
            raise ChunkError("a ChunkedTensor's chunks can be read only once")
        self._used = True
        if not self.shape:  # a scalar: one chunk holding it
            for c in self._chunks:
                c = np.asarray(c)
                if c.shape != () or c.dtype != self.dtype:
                    raise ChunkError(f"a scalar tensor's chunk must be a {self.dtype} scalar, got {c.dtype}{c.shape}")
                yield c
            return
        rows = 0
        for c in self._chunks:
            c = np.asarray(c)
            if c.dtype != self.dtype or c.shape[1:] != self.shape[1:] or c.ndim != self.ndim:
                raise ChunkError(
                    f"chunk of {c.dtype}{list(c.shape)} does not fit a {self.dtype}{list(self.shape)} "
                    f"tensor (rows {rows}..)"
                )
            rows += c.shape[0]
            if rows > self.shape[0]:
                raise ChunkError(f"chunks hold more than the {self.shape[0]} rows of the tensor")
            yield c
        if rows != self.shape[0]:
            raise ChunkError(f"chunks hold {rows} of the tensor's {self.shape[0]} rows")

    def map(self, fn: Callable[[np.ndarray], np.ndarray], dtype: np.dtype) -> ChunkedTensor:
        """The same tensor with `fn` applied to every chunk (e.g. a cast), as `dtype`."""
        return ChunkedTensor(self.shape, dtype, (fn(c) for c in self))

    def __repr__(self) -> str:
        return f"ChunkedTensor({self.dtype}{list(self.shape)})"


def rows_of(
    read: Callable[[int, int], np.ndarray], shape: tuple[int, ...], dtype: np.dtype, rows_per_chunk: int
) -> ChunkedTensor:
    """A `ChunkedTensor` reading `rows_per_chunk` rows at a time through `read(r0, r1)`."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("a scalar tensor has no rows to read in chunks")
    step = max(int(rows_per_chunk), 1)
    return ChunkedTensor(shape, dtype, (read(r0, min(r0 + step, shape[0])) for r0 in range(0, shape[0], step)))
