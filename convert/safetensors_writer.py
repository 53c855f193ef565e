"""A streaming safetensors file writer: holds one chunk of one tensor in memory, not a shard.

``safetensors.numpy.save_file`` needs every tensor of a file in memory at once
and copies them again into bytes. Here each tensor's bytes go straight to a
side file as it arrives (an array, or a ``convert.chunked.ChunkedTensor``
written chunk by chunk); closing writes the header (name -> dtype, shape,
data_offsets; the format's ``__metadata__``) and then the data, copied from
the side file by the kernel (``os.copy_file_range``; no user-space buffer).
The result is a standard safetensors file: the header is JSON padded with
spaces to a multiple of 8 bytes, as safetensors itself writes it, and tensor
bytes are the arrays' raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.chunked import ChunkedTensor

_TAGS: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


def dtype_tag(dt: np.dtype) -> str:
    """safetensors dtype tag ('F32', 'BF16', ...) of a numpy dtype."""
    try:
        return _TAGS[np.dtype(dt)]
    except KeyError:
        raise TypeError(f"dtype {dt} has no safetensors equivalent") from None


def _copy_all(src, dst, start: int, nbytes: int) -> None:
    """Copy `nbytes` of `src` (from its start) to `dst` at offset `start`, inside the kernel when it can."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(nbytes - done, 1 << 30))
                if n == 0:
                    break
                done += n
        except OSError:  # e.g. across file systems on old kernels: copy the rest in user space
            pass
    if done < nbytes:
        src.seek(done)
        dst.seek(start + done)
        shutil.copyfileobj(src, dst, length=16 << 20)


class StreamingSafetensorsWriter:
    """Append tensors one by one, then ``close()`` to produce ``path``."""

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, arr: np.ndarray | ChunkedTensor) -> None:
        """Write one tensor's bytes now (C order, little-endian); a ChunkedTensor chunk by chunk."""
        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice")
        begin = self.nbytes
        tag = dtype_tag(arr.dtype)
        for part in arr if isinstance(arr, ChunkedTensor) else (arr,):
            self._write(part)
        if self.nbytes - begin != arr.nbytes:
            raise ValueError(
                f"tensor {name!r}: wrote {self.nbytes - begin} bytes, its shape and dtype need {arr.nbytes}"
            )
        self._header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [begin, self.nbytes]}

    def _write(self, arr: np.ndarray) -> None:
        # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        # A memoryview of the array (ndarray.data): no intermediate bytes copy.
        self._data.write(arr.reshape(-1).view(np.uint8).data)
        self.nbytes += arr.nbytes

    def __len__(self) -> int:
        return len(self._header)

    def names(self) -> list[str]:
        return list(self._header)

    def close(self) -> Path:
        """Write header + data to ``path`` and remove the side file."""
        self._data.close()
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        header.update(self._header)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        with open(self.path, "wb") as out, open(self._data_path, "rb") as src:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            out.flush()
            _copy_all(src, out, 8 + len(blob), self.nbytes)
        os.unlink(self._data_path)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        self._data.close()
        for p in (self._data_path, self.path):
            if p.exists():
                p.unlink()
