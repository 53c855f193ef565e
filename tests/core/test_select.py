"""The one exact-k selection (`sgtv_jax.select`): its device and host paths against one stable-argsort oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sgtv_jax.select import NARROW_ROWS, digit_plan, largest_mask, smallest_mask, smallest_mask_rows

BF16 = np.dtype(ml_dtypes.bfloat16)


# --------------------------------------------------------------------------- selection


def ref_smallest(s: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros(s.size, bool)
    m[np.argsort(s.astype(np.float64), kind="stable")[:k]] = True
    return m


def ref_largest(s: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros(s.size, bool)
    m[np.argsort(-s.astype(np.float64), kind="stable")[:k]] = True
    return m


def scores_with_ties(rng: np.random.Generator, n: int, dtype, kind: str) -> np.ndarray:
    s = np.abs(rng.standard_normal(n))
    if kind == "ties":
        s = np.round(s * 3) / 3  # a handful of distinct values
    elif kind == "zeros":
        s[rng.random(n) < 0.6] = 0.0
    return s.astype(dtype)


@pytest.mark.parametrize("path", ["device", "host"])
@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros"])
def test_selection_matches_stable_argsort(dtype, kind, path):
    """The one exact-k selection: its device path (JAX radix select, jitted) and its host path
    (NumPy in: sampled bracket + partition) against the same stable-argsort oracle."""
    rng = np.random.default_rng(0)
    if path == "device":
        small, large = jax.jit(smallest_mask), jax.jit(largest_mask)
        sizes: tuple[int, ...] = (1, 2, 7, 300, 5000)
    else:  # NumPy arrays select on the host; 300_000 entries is past the bracket's size threshold
        small, large = smallest_mask, largest_mask
        sizes = (1, 2, 7, 300, 5000, 300_000)
    for n in sizes:
        s = scores_with_ties(rng, n, dtype, kind)
        x = jnp.asarray(s) if path == "device" else s
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            np.testing.assert_array_equal(np.asarray(small(x, k)), ref_smallest(s, k))
            np.testing.assert_array_equal(np.asarray(large(x, k)), ref_largest(s, k))


def test_selection_rows_with_wide_digits_match_stable_argsort():
    """`smallest_mask_rows` (the OBS sweep's per-task cuts of a block) on rows long enough for
    16-bit digits, each row its own k and kind of ties, against the stable-argsort oracle."""
    rng = np.random.default_rng(2)
    n = NARROW_ROWS + 4001
    assert digit_plan(32, n)[0][1] == 16
    rows = np.stack([scores_with_ties(rng, n, np.float32, kind) for kind in ("distinct", "ties", "zeros")])
    select = jax.jit(smallest_mask_rows)
    for ks in ([0, 4 * n // 5, n - 1], [n, 1, n // 2], [n // 3, n // 3, 4 * n // 5]):
        got = np.asarray(select(jnp.asarray(rows), jnp.asarray(ks, jnp.int32)))
        for r, k in enumerate(ks):
            np.testing.assert_array_equal(got[r], ref_smallest(rows[r], k))


def test_selection_float64_signed_zero_and_negative():
    with jax.enable_x64(True):
        s = np.array([0.5, -0.0, 0.0, -2.0, 3.0, 0.5, -0.0, 1e-300, np.inf], np.float64)
        for k in range(s.size + 1):
            got = np.asarray(smallest_mask(jnp.asarray(s), k))
            # float order with -0 just below +0: a stable sort on (value, signbit)
            order = sorted(range(s.size), key=lambda i: (s[i], not np.signbit(s[i])))
            want = np.zeros(s.size, bool)
            want[order[:k]] = True
            np.testing.assert_array_equal(got, want)


def test_selection_traced_k_under_vmap():
    rng = np.random.default_rng(1)
    rows = np.round(np.abs(rng.standard_normal((5, 200))) * 4).astype(np.float32)
    ks = np.array([0, 17, 100, 199, 200], np.int32)
    got = np.asarray(jax.jit(jax.vmap(largest_mask))(jnp.asarray(rows), jnp.asarray(ks)))
    for r in range(5):
        np.testing.assert_array_equal(got[r], ref_largest(rows[r], int(ks[r])))


def test_digit_plan_covers_the_key():
    for bits in (16, 32, 64):
        for n in (1, 100, 10**4, 10**8):
            plan = digit_plan(bits, n)
            assert sum(w for _, w in plan) == bits and plan[-1][0] == 0
            assert all(s == s2 + w2 for (s, _), (s2, w2) in zip(plan, plan[1:]))
    assert len(digit_plan(32, 10**8)) == 2 and len(digit_plan(16, 10**8)) == 1
