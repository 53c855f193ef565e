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
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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


AHEAD_ITEMS = 4
"""Outputs (whole tensors or row chunks) `ahead` lets its worker finish before they are written."""

_START, _CHUNK, _END, _WHOLE, _DONE, _ERROR = range(6)


class ahead:  # noqa: N801 - used like a function: `for name, value in ahead(stream): ...`
    """`stream` (`(name, array | ChunkedTensor)` pairs) produced in a worker thread, `depth` items ahead.

    The worker runs the stream (for a merge: reading and merging) and reads
    every `ChunkedTensor` chunk by chunk, while the caller writes what came
    before: a bounded queue of at most `depth` finished items (whole tensors
    or row chunks) sits between them, so memory is the stream's own working
    set plus `depth + 1` outputs. Items arrive in order and unchanged; an
    exception in the worker is raised in the caller where that item would
    have come (the same exception object). `close()` (or leaving a `with
    ahead(...)` block, e.g. on an error while writing) stops the worker and
    waits for it, so the stream's files can be closed after it.
    """

    def __init__(self, stream: Iterable[tuple[str, Any]], depth: int = AHEAD_ITEMS) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(stream,), name="sgtv-ahead", daemon=True)
        self._started = False

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, stream: Iterable[tuple[str, Any]]) -> None:
        it = iter(stream)
        try:
            for name, value in it:
                if not isinstance(value, ChunkedTensor):
                    if not self._put((_WHOLE, name, value)):
                        return
                    continue
                if not self._put((_START, name, value.shape, value.dtype)):
                    return
                for c in value:
                    if not self._put((_CHUNK, c)):
                        return
                self._put((_END,))
            self._put((_DONE,))
        except BaseException as e:  # raised again in the caller
            self._put((_ERROR, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _get(self) -> tuple:
        item = self._queue.get()
        if item[0] == _ERROR:
            raise item[1]
        return item

    def _chunks(self) -> Iterator[np.ndarray]:
        while (item := self._get())[0] == _CHUNK:
            yield item[1]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        if self._started:
            raise RuntimeError("ahead(...) can be iterated only once")
        self._started = True
        self._thread.start()
        try:
            while (item := self._get())[0] != _DONE:
                if item[0] == _WHOLE:
                    yield item[1], item[2]
                    continue
                tensor = ChunkedTensor(item[2], item[3], self._chunks())
                yield item[1], tensor
                if not tensor._used:  # the caller skipped its chunks: pass them by
                    for _ in tensor:
                        pass
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker (after the item it is on) and wait for it; what it had finished is dropped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
