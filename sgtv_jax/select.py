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
per bit of the key. The device path works on rows `[T, n]` (`smallest_mask_rows`,
the OBS sweep's per-task cuts of a block): every row's histogram is one flat
scatter-add, and the digit is found by a two-level running count (a cumsum over
65536 bins cost as much as the histogram on CPU). The same digit plan drives the host-side, chunk-by-chunk
selection of `sgtv_jax.merge.streaming`, so both find the same threshold.

Host path: the same two functions take NumPy arrays too and then select in
NumPy (`host_take_smallest`: a uniform sample brackets the k-th key, one
pass counts below the bracket and partitions the few inside). The row-chunked
merge (`sgtv_jax.merge.chunk_select`) builds its cut points from the same
`Cut` / `bracket_cut` / `nth_true`. One oracle test covers both paths
(`tests/test_select.py::test_selection_matches_stable_argsort`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

WIDE_DIGIT_BITS = 16
"""Digit width for long rows: a histogram of 65536 counters per pass."""
NARROW_DIGIT_BITS = 8
"""Digit width for rows of at most `NARROW_ROWS` entries (256 counters)."""
NARROW_ROWS = 1 << 14
SPARE_BINS = 64
"""Histogram bins (past the digit's) counting the entries outside the prefix found so far."""


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


def _first_reaching(counts: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of `counts` `[T, n]` (ints >= 0): (the first index whose running count reaches
    `k` `[T]`, the count before it).

    Two levels (blocks of ~sqrt(n) entries, then inside the one block) instead of one
    cumulative sum over `n`: XLA's CPU cumsum over the 65536 bins of a radix digit cost as
    much as the histogram pass itself.
    """
    rows, n = counts.shape
    block = 1 << (max(n, 1).bit_length() // 2)
    nblocks = -(-n // block)
    nested = jnp.pad(counts, ((0, 0), (0, nblocks * block - n))).reshape(rows, nblocks, block)
    coarse = jnp.sum(nested, axis=2)
    cum = jnp.cumsum(coarse, axis=1)
    r = jnp.argmax(cum >= k[:, None], axis=1).astype(jnp.int32)
    before = jnp.take_along_axis(cum - coarse, r[:, None], axis=1)
    inside = jnp.take_along_axis(nested, r[:, None, None], axis=1)[:, 0]
    fine = before + jnp.cumsum(inside, axis=1)
    j = jnp.argmax(fine >= k[:, None], axis=1).astype(jnp.int32)
    return r * block + j, jnp.take_along_axis(fine - inside, j[:, None], axis=1)[:, 0]


def kth_smallest_key(keys: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of `keys` `[T, n]`: (the k-th smallest key, how many keys are strictly smaller),
    `[T]` each; 1 <= k <= n.

    For k = 0 returns (0, 0). One histogram pass per digit of `digit_plan`, the rows of
    all tasks in one flat scatter-add (a batched scatter cost twice as much on CPU); an
    entry whose higher digits leave the prefix found so far counts in a spare bin.
    """
    rows, n = keys.shape
    kd = keys.dtype
    prefix = jnp.zeros((rows,), kd)
    below = jnp.zeros((rows,), jnp.int32)
    offsets = jnp.arange(rows, dtype=jnp.int32)[:, None]
    # Entries outside the prefix go to SPARE_BINS spare bins in turn: all in one bin, each
    # add waited for the previous one (2x the pass's time on CPU).
    spare = jnp.arange(n, dtype=jnp.int32) & (SPARE_BINS - 1)
    for i, (shift, width) in enumerate(digit_plan(8 * kd.itemsize, n)):
        bins = 1 << width
        bins_after = bins + SPARE_BINS
        digit = ((keys >> kd.type(shift)) & kd.type(bins - 1)).astype(jnp.int32)
        if i:  # only entries whose higher digits equal the prefix found so far
            digit = jnp.where(keys >> kd.type(shift + width) == prefix[:, None], digit, bins + spare)
        flat = (digit + offsets * bins_after).reshape(-1)
        hist = jnp.zeros(rows * bins_after, jnp.int32).at[flat].add(1, mode="promise_in_bounds")
        d, before = _first_reaching(hist.reshape(rows, bins_after)[:, :bins], k - below)
        prefix = (prefix << kd.type(width)) | d.astype(kd)
        below = below + before
    return prefix, below


def first_true_cutoff(flags: jax.Array, need: jax.Array) -> jax.Array:
    """Per row of `flags` `[T, n]`: the index just after the `need`-th True (0 when need <= 0)."""
    index, _ = _first_reaching(flags.astype(jnp.int32), need)
    return jnp.where(need > 0, index + 1, 0)


def _take_smallest_keys(keys: jax.Array, k: jax.Array) -> jax.Array:
    """Bool mask `[T, n]` of the `k` `[T]` smallest keys of each row of `keys` `[T, n]`, ties by index."""
    k = k.astype(jnp.int32)
    thresh, below = kth_smallest_key(keys, k)
    equal = keys == thresh[:, None]
    cutoff = first_true_cutoff(equal, k - below)
    return (keys < thresh[:, None]) | (equal & (jnp.arange(keys.shape[1], dtype=jnp.int32) < cutoff[:, None]))


def smallest_mask_rows(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Bool mask `[T, n]`: per row of `scores` `[T, n]`, its `k[t]` smallest; ties: earlier index first.

    `smallest_mask` for many rows at once (the OBS sweep's per-task cuts of one
    block): one program for every row instead of a `vmap` of one row's.
    """
    if scores.shape[1] == 0:
        return jnp.zeros(scores.shape, bool)
    return _take_smallest_keys(order_key(scores), jnp.asarray(k))


def smallest_mask(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """Bool mask `[n]` of the `k` smallest of `scores` `[n]`; ties: earlier index first.

    `0 <= k <= n`; `k` may be traced. Exact for every float dtype (no NaN).
    A NumPy `scores` takes the host path (`host_take_smallest`; a NumPy mask),
    a JAX array the device path (radix select); both give the same mask.
    """
    if scores.ndim != 1:
        raise ValueError(f"smallest_mask selects within one row [n], got shape {scores.shape}")
    if isinstance(scores, np.ndarray):  # host path: NumPy in, NumPy out
        return host_take_smallest(_host_order_key(scores), int(k))
    if scores.shape[0] == 0:
        return jnp.zeros((0,), bool)
    return _take_smallest_keys(order_key(scores)[None], jnp.asarray(k)[None])[0]


def largest_mask(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """Bool mask `[n]` of the `k` largest of `scores` `[n]`; ties: earlier index kept first."""
    if scores.ndim != 1:
        raise ValueError(f"largest_mask selects within one row [n], got shape {scores.shape}")
    if isinstance(scores, np.ndarray):  # host path: NumPy in, NumPy out
        return host_take_smallest(~_host_order_key(scores), int(k))
    if scores.shape[0] == 0:
        return jnp.zeros((0,), bool)
    # ~key reverses the order and keeps equal entries equal, so index order still breaks ties
    return _take_smallest_keys(~order_key(scores)[None], jnp.asarray(k)[None])[0]


# --------------------------------------------------------------------------- host path (NumPy)


class Cut(NamedTuple):
    """The m smallest of some keys: those below `key`, plus the first `ties` keys equal to it in
    the selection order; a transposed order (`sgtv_jax.merge.chunk_select`) takes every tie in
    columns < `col` and the first `col_ties` ties (by row) of column `col`."""

    key: int
    ties: int
    col: int = -1
    col_ties: int = 0


SAMPLE = 1 << 16
"""Keys sampled to bracket the k-th key of keys held in memory."""


def cut_at(key: int, below: int, equal: int, m: int) -> Cut:
    """The cut taking the m smallest keys when `below` keys are < `key` and `equal` are == it."""
    ties = m - below
    return Cut(key + 1, 0) if ties == equal else Cut(key, ties)


def bracket_cut(keys: np.ndarray, m: int, key_max: int | None = None) -> Cut | None:
    """The cut of the m smallest of `keys` `[n]` (1 <= m <= n), or None when the bracket misses.

    Small n: `np.partition`. Else the keys at ranks `m/n * s -/+ (6 sigma + 16)` of a
    uniform sample of s = SAMPLE positions bracket the m-th key; one pass counts the keys
    below the bracket and gathers those inside (at most n / 8), whose partition gives it.
    `key_max`: the largest key there can be (default: the dtype's), the bracket's top end.
    """
    n, kt = keys.size, keys.dtype.type
    if n <= 4 * SAMPLE:
        key = int(np.partition(keys, m - 1)[m - 1])
        return cut_at(key, int(np.count_nonzero(keys < key)), int(np.count_nonzero(keys == key)), m)
    sample = np.sort(keys[np.random.default_rng(0).integers(0, n, SAMPLE)])
    q = m / n
    delta = 6.0 * math.sqrt(SAMPLE * q * (1.0 - q)) + 16.0
    lo_i, hi_i = int(q * SAMPLE - delta), int(q * SAMPLE + delta) + 1
    lo = int(sample[lo_i]) if lo_i >= 0 else 0
    hi = int(sample[hi_i]) if hi_i < SAMPLE else (int(np.iinfo(keys.dtype).max) if key_max is None else key_max)
    below = int(np.count_nonzero(keys < kt(lo)))
    if below >= m:
        return None
    if lo == hi:
        equal = int(np.count_nonzero(keys == kt(lo)))
        return cut_at(lo, below, equal, m) if below + equal >= m else None
    inside = (keys - kt(lo)) <= kt(hi - lo)  # keys below lo wrap around: outside
    count = int(np.count_nonzero(inside))
    if below + count < m:
        return None
    if count > n // 8:  # a wide bracket, usually many ties at its ends: settle those first
        at_lo = int(np.count_nonzero(keys == kt(lo)))
        if below + at_lo >= m:
            return cut_at(lo, below, at_lo, m)
        at_hi = int(np.count_nonzero(keys == kt(hi)))
        if below + count - at_hi < m:
            return cut_at(hi, below + count - at_hi, at_hi, m)
        if count - at_lo - at_hi > n // 8:
            return None
        below += at_lo
        inside &= (keys != kt(lo)) & (keys != kt(hi))
    cand = keys[inside]
    key = int(np.partition(cand, m - below - 1)[m - below - 1])
    return cut_at(key, below + int(np.count_nonzero(cand < key)), int(np.count_nonzero(cand == key)), m)


def nth_true(flags: np.ndarray, nth: int) -> int:
    """Index of the `nth` (1-based) True of the bool vector `flags`: counts per block, then one block."""
    block = 1 << 16
    whole = flags.size // block * block
    counts = np.count_nonzero(flags[:whole].reshape(-1, block), axis=1)
    cum = np.cumsum(counts)
    j = int(np.searchsorted(cum, nth))  # the first block whose running count reaches nth
    before = int(cum[j - 1]) if j else 0
    start = j * block
    return start + int(
        np.flatnonzero(flags[start : start + block] if j < len(counts) else flags[start:])[nth - before - 1]
    )


def _host_order_key(scores: np.ndarray) -> np.ndarray:
    """`order_key` in NumPy: unsigned integers ordered as the floats `scores`."""
    kd = key_dtype(scores.dtype)
    bits = np.ascontiguousarray(scores).view(kd)
    top = kd.type(1 << (8 * kd.itemsize - 1))
    return np.where(bits >= top, ~bits, bits | top)


def host_take_smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """Bool mask `[n]` of the `k` smallest unsigned `keys` `[n]`, ties by index, on the host:
    a sampled bracket (`bracket_cut`), a full partition when it misses."""
    n = keys.size
    if k <= 0:
        return np.zeros(n, bool)
    if k >= n:
        return np.ones(n, bool)
    cut = bracket_cut(keys, k)
    if cut is None:  # the sample's bracket missed: partition everything
        key = int(np.partition(keys, k - 1)[k - 1])
        cut = cut_at(key, int(np.count_nonzero(keys < key)), int(np.count_nonzero(keys == key)), k)
    out = keys < keys.dtype.type(cut.key)
    if cut.ties:
        eq = keys == keys.dtype.type(cut.key)
        end = nth_true(eq, cut.ties) + 1
        out[:end] |= eq[:end]
    return out
