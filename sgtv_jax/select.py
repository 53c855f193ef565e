"""Exact k-smallest / k-largest selection by radix select over float bit patterns.

`smallest_mask(scores, k)` marks the `k` smallest entries of `scores` `[n]`,
ties broken by index (the earlier of equal entries is taken first);
`largest_mask` the `k` largest, the earlier of equal entries kept first. Both
are what two stable argsorts would give, without a sort:

1. each float is mapped to an unsigned integer `key` with the same order
   (`order_key`: the usual radix-sort key, -0 just below +0);
2. the k-th smallest key is found digit by digit, high digits first: one
   histogram of the current digit over the entries whose higher digits match
   the prefix found so far (`digit_plan`: two passes of 16 bits for float32,
   one for bfloat16 / float16, four for float64; 8-bit digits for short rows);
3. entries with `key < threshold` are taken, plus the first `need` entries
   equal to it (`need = k - count(key < threshold)`), located by counting the
   ties per block of ~sqrt(n) entries, then inside the one block that holds
   the last of them.

Each step is a fixed-shape XLA program: `k` may be traced (jit / vmap), and
the cost is a few passes over the data (histograms and two compares), not one
per bit of the key. The same digit plan drives the host-side, chunk-by-chunk
selection of `sgtv_jax.merge.streaming`, so both find the same threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WIDE_DIGIT_BITS = 16
"""Digit width for long rows: a histogram of 65536 counters per pass."""
NARROW_DIGIT_BITS = 8
"""Digit width for rows of at most `NARROW_ROWS` entries (256 counters)."""
NARROW_ROWS = 1 << 14


def key_dtype(dtype: np.dtype) -> np.dtype:
    """The unsigned integer type of `dtype`'s bit patterns (uint16 / uint32 / uint64)."""
    size = np.dtype(dtype).itemsize
    if size not in (2, 4, 8):
        raise TypeError(f"selection needs a 16-, 32- or 64-bit float dtype, got {dtype}")
    return np.dtype(f"uint{8 * size}")


def digit_plan(key_bits: int, n: int) -> tuple[tuple[int, int], ...]:
    """`(shift, width)` of each digit, most significant first, for `n` entries per selection.

    16-bit digits, or 8-bit ones for short rows (a histogram never dwarfs the
    row it counts); all digits of a plan have the same width.
    """
    width = NARROW_DIGIT_BITS if n <= NARROW_ROWS else WIDE_DIGIT_BITS
    return tuple((shift, width) for shift in range(key_bits - width, -1, -width))


def order_key(scores: jax.Array) -> jax.Array:
    """Unsigned integers ordered as the floats `scores` (-0 just below +0; NaN above +inf)."""
    kd = key_dtype(scores.dtype)
    bits = jax.lax.bitcast_convert_type(scores, kd)
    top = kd.type(1 << (8 * kd.itemsize - 1))
    # negative floats: flip every bit (reverses their order); others: set the sign bit
    return jnp.where(bits >= top, ~bits, bits | top)


def kth_smallest_key(keys: jax.Array, k: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """(the k-th smallest of `keys` `[n]`, how many keys are strictly smaller); 1 <= k <= n.

    For k = 0 returns (0, 0). One histogram pass per digit of `digit_plan`
    (a loop, so the program holds one histogram whatever the digit count).
    """
    n = keys.shape[0]
    kd = keys.dtype
    plan = digit_plan(8 * kd.itemsize, n)
    width = plan[0][1]
    bins = 1 << width
    k = jnp.asarray(k, jnp.int32)

    def one_digit(i, carry):
        prefix, below = carry
        shift = (len(plan) - 1 - i) * width
        digit = ((keys >> shift.astype(kd)) & kd.type(bins - 1)).astype(jnp.int32)
        # only entries whose higher digits equal the prefix found so far (all of them at i = 0;
        # a shift by the key's whole width is undefined, hence the where)
        high = jnp.where(i == 0, kd.type(0), keys >> jnp.minimum(shift + width, 8 * kd.itemsize - 1).astype(kd))
        if_high = jnp.where(i == 0, True, high == prefix)
        hist = jnp.zeros(bins, jnp.int32).at[jnp.where(if_high, digit, bins)].add(1, mode="drop")
        cum = below + jnp.cumsum(hist)
        d = jnp.argmax(cum >= k).astype(jnp.int32)
        return (prefix << kd.type(width)) | d.astype(kd), cum[d] - hist[d]

    return jax.lax.fori_loop(0, len(plan), one_digit, (jnp.zeros((), kd), jnp.zeros((), jnp.int32)))


def first_true_cutoff(flags: jax.Array, need: jax.Array) -> jax.Array:
    """The index just after the `need`-th True of `flags` `[n]` (0 when need <= 0).

    Counts per block of ~sqrt(n) entries, then inside the block holding it:
    two small cumulative sums instead of one over `n`.
    """
    n = flags.shape[0]
    block = 1 << ((max(n, 1).bit_length() + 1) // 2)
    nblocks = -(-n // block)
    padded = jnp.pad(flags, (0, nblocks * block - n))
    counts = jnp.sum(padded.reshape(nblocks, block), axis=1, dtype=jnp.int32)
    cum = jnp.cumsum(counts)
    need = jnp.asarray(need, jnp.int32)
    j = jnp.argmax(cum >= need).astype(jnp.int32)
    before = cum[j] - counts[j]
    local = before + jnp.cumsum(jax.lax.dynamic_slice_in_dim(padded, j * block, block).astype(jnp.int32))
    i = jnp.argmax(local >= need).astype(jnp.int32)
    return jnp.where(need > 0, j * block + i + 1, 0)


def _take_smallest_keys(keys: jax.Array, k: jax.Array | int) -> jax.Array:
    thresh, below = kth_smallest_key(keys, k)
    equal = keys == thresh
    cutoff = first_true_cutoff(equal, jnp.asarray(k, jnp.int32) - below)
    return (keys < thresh) | (equal & (jnp.arange(keys.shape[0], dtype=jnp.int32) < cutoff))


def smallest_mask(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """Bool mask `[n]` of the `k` smallest of `scores` `[n]`; ties: earlier index first.

    `0 <= k <= n`; `k` may be traced. Exact for every float dtype (no NaN).
    """
    if scores.ndim != 1:
        raise ValueError(f"smallest_mask selects within one row [n], got shape {scores.shape}")
    if scores.shape[0] == 0:
        return jnp.zeros((0,), bool)
    return _take_smallest_keys(order_key(scores), k)


def largest_mask(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """Bool mask `[n]` of the `k` largest of `scores` `[n]`; ties: earlier index kept first."""
    if scores.ndim != 1:
        raise ValueError(f"largest_mask selects within one row [n], got shape {scores.shape}")
    if scores.shape[0] == 0:
        return jnp.zeros((0,), bool)
    # ~key reverses the order and keeps equal entries equal, so index order still breaks ties
    return _take_smallest_keys(~order_key(scores), k)
