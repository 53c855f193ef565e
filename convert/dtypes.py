"""Output dtypes by name, and the safetensors dtype tags they correspond to."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from convert.errors import ConvertError

# Accepted spellings -> numpy dtype. bfloat16 comes from ml_dtypes, which is what
# safetensors' numpy backend returns for BF16 tensors.
_DTYPES: dict[str, np.dtype] = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "fp16": np.dtype(np.float16),
    "float16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
    "float32": np.dtype(np.float32),
}

# numpy dtype -> the name transformers writes into config.json's "dtype".
_CONFIG_NAMES: dict[np.dtype, str] = {
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float16): "float16",
    np.dtype(np.float32): "float32",
}

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def parse_dtype(name: str | np.dtype | type) -> np.dtype:
    """Map 'bf16' / 'fp16' / 'fp32' (or a numpy dtype of those) to a numpy dtype."""
    if isinstance(name, str):
        try:
            return _DTYPES[name.lower()]
        except KeyError:
            raise ConvertError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}") from None
    dt = np.dtype(name)
    if dt not in _CONFIG_NAMES:
        raise ConvertError(f"unsupported output dtype {dt}; choose one of {', '.join(DTYPE_CHOICES)}")
    return dt


def config_dtype_name(dt: np.dtype) -> str:
    """The string transformers expects in config.json for a float dtype."""
    return _CONFIG_NAMES[np.dtype(dt)]


def is_float(dt: np.dtype) -> bool:
    """True for the floating dtypes we cast and NaN-check (ints pass through)."""
    dt = np.dtype(dt)
    return dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16)


# Exponent bits of each floating width: all ones is Inf or NaN (IEEE 754; bfloat16 is float32's top half).
_EXPONENT: dict[int, tuple[type[np.unsignedinteger], int]] = {
    2: (np.uint16, 0x7C00),
    4: (np.uint32, 0x7F800000),
    8: (np.uint64, 0x7FF0000000000000),
}
_BF16 = np.dtype(ml_dtypes.bfloat16)
FINITE_BLOCK = 1 << 16
"""Entries per block of `count_nonfinite`'s scan: a block's temporary stays in cache."""


def count_nonfinite(a: np.ndarray) -> int:
    """How many entries of a floating array are NaN or Inf (0 for other dtypes): `(~np.isfinite(a)).sum()`.

    Scans the bit patterns block by block (exponent all ones) and counts with
    `np.isfinite` only when a block has one: several times faster than
    `np.isfinite` on bfloat16 (an ml_dtypes ufunc) and free of a whole-array
    temporary. Checks every tensor a merge reads and writes, so it sits on the I/O path.
    """
    if not is_float(a.dtype) or a.size == 0:
        return 0
    if a.dtype.itemsize not in _EXPONENT:  # e.g. float128: the plain ufunc
        return int(a.size - np.count_nonzero(np.isfinite(a)))
    uint, mask = _EXPONENT[a.dtype.itemsize]
    if a.dtype == _BF16:
        mask = 0x7F80
    flat = np.ascontiguousarray(a).reshape(-1).view(uint)
    m = np.array(mask, dtype=uint)
    tmp, bad = np.empty(min(flat.size, FINITE_BLOCK), uint), 0
    for i in range(0, flat.size, FINITE_BLOCK):
        block = flat[i : i + FINITE_BLOCK]
        part = np.bitwise_and(block, m, out=tmp[: block.size])
        if part.max() == m:
            bad += int(block.size - np.count_nonzero(np.isfinite(block.view(a.dtype))))
    return bad
