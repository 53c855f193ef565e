"""`jax.random.uniform` / `bernoulli` draws for one block of a larger array.

With the threefry PRNG in its partitionable form (JAX's default), the random
bits of entry `i` of a draw of any shape are `threefry2x32(key, (hi(i),
lo(i)))` of its row-major flat index `i` (a 64-bit counter split in two 32-bit
words). So the draw for rows `[r0, r1)` of a `[rows, cols]` array is the same
computation on the counters `r0 * cols ...`: `uniform_block(key, shape,
dtype, offset)` returns exactly `jax.random.uniform(key, full_shape,
dtype).reshape(-1)[offset : offset + size].reshape(shape)` without drawing
the rest, and `bernoulli_block` likewise for `jax.random.bernoulli(key, p,
full_shape)`. The `*_transposed_block` variants give a block of rows of an
array whose draw was made for its transpose (counters `col * rows + row`).
`tests/test_streaming.py` checks them all against jax.random.

`counter_based(key)` says whether that identity holds for `key` (threefry
implementation, partitionable bits); callers fall back to `jax.random` on the
whole array when it does not.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

_MANTISSA: dict[np.dtype, tuple[int, int, Any]] = {
    np.dtype(np.float32): (32, 23, np.uint32),
    np.dtype(np.float64): (64, 52, np.uint64),
}


def _is_typed(key: jax.Array) -> bool:
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def counter_based(key: jax.Array) -> bool:
    """True when `key`'s draws are threefry's partitionable counter-based bits (JAX's default)."""
    if not jax.config.jax_threefry_partitionable:  # type: ignore[attr-defined]  # dynamic option
        return False
    if _is_typed(key):
        return "threefry" in str(jax.random.key_impl(key))
    impl = jax.config.jax_default_prng_impl  # type: ignore[attr-defined]  # dynamic option
    return impl == "threefry2x32" and tuple(key.shape[-1:]) == (2,)


def _words(key: jax.Array) -> jax.Array:
    """The key as uint32 words `[..., 2]`."""
    return jax.random.key_data(key) if _is_typed(key) else jnp.asarray(key, jnp.uint32)


def _floats(bits1: jax.Array, bits2: jax.Array, dtype: np.dtype) -> jax.Array:
    """jax.random.uniform's mapping of threefry words to [0, 1): a random mantissa with exponent 0, minus 1."""
    nbits, nmant, utype = _MANTISSA[np.dtype(dtype)]
    if nbits == 32:
        bits = bits1 ^ bits2
    else:
        bits = (bits1.astype(utype) << utype(32)) | bits2.astype(utype)
    one = np.array(1.0, dtype).view(utype)
    floats = jax.lax.bitcast_convert_type((bits >> utype(nbits - nmant)) | one, dtype) - jnp.array(1.0, dtype)
    return jax.lax.max(jnp.array(0.0, dtype), floats)


@partial(jax.jit, static_argnames=("dtype",))
def _uniform_at(words: jax.Array, base_hi: jax.Array, base_lo: jax.Array, add: jax.Array, dtype: np.dtype) -> jax.Array:
    """Uniforms at the 64-bit counters `(base_hi, base_lo) + add` (broadcast; `add` uint32)."""
    lo = base_lo + add
    hi = base_hi + (lo < base_lo).astype(jnp.uint32)  # carry into the high word
    bits1, bits2 = threefry2x32_p.bind(words[0], words[1], *jnp.broadcast_arrays(hi, lo))
    return _floats(bits1, bits2, dtype)


@partial(jax.jit, static_argnames=("shape", "dtype"))
def _uniform_contiguous(
    words: jax.Array, off_hi: jax.Array, off_lo: jax.Array, shape: tuple[int, ...], dtype: np.dtype
) -> jax.Array:
    return _uniform_at(words, off_hi, off_lo, jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape), dtype)


def _split(values: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, np.uint64)
    return (v >> np.uint64(32)).astype(np.uint32), (v & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _checked_words(key: jax.Array, dtype: np.dtype) -> jax.Array:
    if np.dtype(dtype) not in _MANTISSA:
        raise TypeError(f"block draws are float32 or float64, got {dtype}")
    if not counter_based(key):
        raise ValueError(
            "block draws need a threefry key with jax_threefry_partitionable on "
            "(JAX's default); draw the whole array with jax.random instead"
        )
    return _words(key)


def uniform_block(key: jax.Array, shape: tuple[int, ...], dtype: Any = np.float32, offset: int = 0) -> jax.Array:
    """Entries `[offset, offset + prod(shape))` (row-major) of a `jax.random.uniform` draw, as `shape`.

    `dtype`: float32 or float64. Needs `counter_based(key)`.
    """
    words = _checked_words(key, dtype)
    hi, lo = _split(offset)
    return _uniform_contiguous(words, hi, lo, tuple(int(s) for s in shape), np.dtype(dtype))


def uniform_transposed_block(
    key: jax.Array, shape: tuple[int, int], dtype: np.dtype, row0: int, total_rows: int
) -> jax.Array:
    """Rows `[row0, row0 + shape[0])` of a `[total_rows, cols]` array whose uniforms were drawn
    for its transpose: entry `[r, c]` is draw `c * total_rows + row0 + r` of
    `jax.random.uniform(key, (cols, total_rows), dtype)`."""
    words = _checked_words(key, dtype)
    rows, cols = (int(s) for s in shape)
    hi, lo = _split(np.arange(cols, dtype=np.uint64)[None, :] * np.uint64(total_rows))
    add = np.arange(row0, row0 + rows, dtype=np.uint32)[:, None]
    return _uniform_at(words, hi, lo, add, np.dtype(dtype))


def _p(p: float | jax.Array) -> jax.Array:
    p = jnp.asarray(p)
    if not jnp.issubdtype(p.dtype, jnp.floating):
        raise TypeError(f"bernoulli probability must be a float, got {p.dtype}")
    return p


def bernoulli_block(key: jax.Array, p: float | jax.Array, shape: tuple[int, ...], offset: int = 0) -> jax.Array:
    """Entries `[offset, offset + prod(shape))` of `jax.random.bernoulli(key, p, full_shape)`, as `shape`.

    As jax.random does: `uniform < p` in `p`'s float dtype (a Python float:
    JAX's default float).
    """
    p = _p(p)
    return uniform_block(key, shape, p.dtype, offset) < p


def bernoulli_transposed_block(
    key: jax.Array, p: float | jax.Array, shape: tuple[int, int], row0: int, total_rows: int
) -> jax.Array:
    """`jax.random.bernoulli(key, p, (cols, total_rows)).T[row0 : row0 + shape[0]]`, drawing only those."""
    p = _p(p)
    return uniform_transposed_block(key, shape, p.dtype, row0, total_rows) < p
