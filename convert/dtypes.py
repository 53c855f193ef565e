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
