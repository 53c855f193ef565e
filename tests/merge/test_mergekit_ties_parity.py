"""TIES against a float64 NumPy reference of mergekit's rule, on real-looking task vectors.

mergekit's TIES, as its source defines it (per tensor, in the load dtype, float32 here):

1. `tau_t = theta_t - theta_0`;
2. `k_t = int(density_t * n)` (truncation) and keep the first `k_t` entries of a
   descending sort of `|tau_t|`;
3. `x_t = w_t tau'_t`; elected sign `+1` where `sum_t x_t >= 0`, else `-1`;
   `m_t = [sign(x_t) == elected]` (a zero never agrees);
4. `sum_t m_t x_t / sum_t m_t w_t` (a zero divisor becomes 1), times lambda.

Its sort is torch's unstable `argsort`, so which of several entries tied at the
threshold it keeps is unspecified; ours keeps the earlier ones (a stable sort),
and so does the reference. `count="floor"` gives mergekit's `int`, the default
`round` differs only where `density * n` has a fractional part >= 1/2 (or a
float error just below an integer). The reference below is written from the
rule, not from either implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import sgtv_jax.merge as M
from sgtv_jax import counts
from sgtv_jax.merge import trim as trim_lib

BF16 = ml_dtypes.bfloat16


def reference_trim(tau: np.ndarray, density: float, count: str) -> np.ndarray:
    flat = np.asarray(tau, np.float64).reshape(-1)
    if density >= 1:
        return flat.reshape(tau.shape)
    k = int(density * flat.size) if count == "floor" else int(round(density * flat.size))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return np.where(keep, flat, 0.0).reshape(tau.shape)


def reference_ties(taus, weights, densities, count="floor", lam=1.0):
    """Merged task vector (float64) and the agreement mask `[T, ...]`."""
    trimmed = np.stack([reference_trim(t, d, count) for t, d in zip(taus, densities)])
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (trimmed.ndim - 1))
    x = w * trimmed
    elected = np.where(x.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(x) == elected
    divisor = (w * agree).sum(0)
    divisor = np.where(divisor == 0, 1.0, divisor)
    return lam * (x * agree).sum(0) / divisor, agree


def real_looking(seed: int, shape: tuple[int, ...]):
    """A bf16 base (stored as float32, as a float32 load gives it) and three float32 fine-tunes.

    Model 0: float32 updates, 30% of the entries untouched (exact zeros in the task vector);
    model 1: trained in bf16 and saved as float32 (coarse steps: many exact zeros and many
    entries of equal magnitude); model 2: updates on a 2^-14 grid (ties in magnitude).
    """
    rng = np.random.default_rng(seed)
    base = (0.02 * rng.standard_normal(shape)).astype(BF16).astype(np.float32)
    upd = (1e-3 * rng.standard_normal((3,) + shape)).astype(np.float32)
    ft0 = np.where(rng.random(shape) < 0.3, base, base + upd[0]).astype(np.float32)
    ft1 = (base + upd[1]).astype(BF16).astype(np.float32)
    ft2 = (base + np.round(upd[2] * 2**14) / 2**14).astype(np.float32)
    return base, [ft0, ft1, ft2]


SHAPES = {"embed": (97, 16), "proj": (48, 40), "bias": (39,), "norm": (100,), "small": (7,)}
WEIGHTS = [1.0, 0.5, 0.75]
DENSITIES = [0.5, 0.29, 0.7]  # 0.29 * 100 = 28.999999999999996: int() gives 28, round() 29


def assert_ulps(got, want64, ulps=2):
    """Equal to float32 rounding: the same zero pattern, and within `ulps` float32 spacings."""
    got = np.asarray(got)
    want32 = want64.astype(np.float32)
    np.testing.assert_array_equal(got == 0, want32 == 0)
    bound = ulps * np.spacing(np.abs(want32))
    assert np.all(np.abs(got.astype(np.float64) - want64) <= bound), np.max(np.abs(got - want64) / bound)


def test_real_looking_deltas_have_zeros_and_threshold_ties():
    base, fts = real_looking(0, SHAPES["proj"])
    taus = [f - base for f in fts]
    assert all(np.mean(t == 0) > 0.01 for t in taus)
    # a tie group straddles the cut for model 1: the tie rule decides which entries survive
    flat = np.sort(np.abs(taus[1]).ravel())[::-1]
    k = int(DENSITIES[1] * flat.size)
    assert flat[k - 1] == flat[k]


@pytest.mark.parametrize("count", ["floor", "round"])
@pytest.mark.parametrize("tensor", list(SHAPES))
def test_ties_equals_mergekit_rule_on_real_looking_deltas(tensor, count):
    base, fts = real_looking(list(SHAPES).index(tensor) + 10, SHAPES[tensor])
    taus = np.stack([f - base for f in fts])  # float32 subtraction, as both tools compute it
    want, agree = reference_ties(taus, WEIGHTS, DENSITIES, count)
    # the trimmed vectors are copies of entries: exactly equal
    trimmed = trim_lib.trim("magnitude", jnp.asarray(taus), DENSITIES, count=count)
    for t, d in enumerate(DENSITIES):
        np.testing.assert_array_equal(np.asarray(trimmed[t]), reference_trim(taus[t], d, count))
    got = M.ties(jnp.asarray(taus), WEIGHTS, DENSITIES, count=count)
    assert_ulps(got, want)


def test_count_rules_floor_and_round_differ_at_fractional_counts():
    taus = jnp.asarray(np.random.default_rng(1).standard_normal((1, 100)).astype(np.float32))

    def kept(count, d, x=taus):
        return int(jnp.sum(trim_lib.trim("magnitude", x, [d], count=count) != 0))

    assert (kept("floor", 0.29), kept("round", 0.29)) == (28, 29)
    odd = taus[:, :7]
    assert (kept("floor", 0.5, odd), kept("round", 0.5, odd)) == (3, 4)  # 3.5: int 3, round-half-even 4
    # mergekit asserts on k == 0; we keep nothing
    assert kept("floor", 0.009) == 0
    gamma_top = trim_lib.breadcrumbs(taus[0], 0.29, gamma=0.029, count="floor")
    assert int(jnp.sum(gamma_top != 0)) == 28
    order = np.argsort(-np.abs(np.asarray(taus[0])), kind="stable")
    # int(0.029 * 100) = 2 outliers dropped (round would drop 3), then the next 28 kept
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(gamma_top)), np.sort(order[2:30]))


def test_whole_model_merge_with_a_bf16_base_matches_the_reference():
    names = list(SHAPES)
    pairs = {n: real_looking(i, SHAPES[n]) for i, n in enumerate(names)}
    base = {n: pairs[n][0] for n in names}
    models = [{n: pairs[n][1][t] for n in names} for t in range(3)]
    out = M.merge("ties", base, models, weights=WEIGHTS, densities=DENSITIES, count="floor")
    for n in names:
        taus = np.stack([models[t][n] - base[n] for t in range(3)])
        want, _ = reference_ties(taus, WEIGHTS, DENSITIES, "floor")
        got = np.asarray(out[n], np.float64) - base[n]
        # theta_0 + merged in float32: compare the task vectors to the rounding of that sum
        bound = 2 * np.spacing(np.abs(base[n]) + np.abs(want).astype(np.float32))
        assert np.all(np.abs(got - want) <= bound), n


def test_count_floor_needs_a_trim_and_known_rules():
    taus = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="no trim"):
        M.task_arithmetic(taus, [1.0, 1.0], count="floor")
    with pytest.raises(ValueError, match="unknown count rule"):
        M.ties(taus, [1.0, 1.0], 0.5, count="ceil")


def _host_floor(v, n):
    return int(float(v) * n)


def test_traced_floor_counts_equal_python_int_at_integer_boundaries():
    rng = np.random.default_rng(0)
    for n in (100, 7, 999_983):
        vals = [np.float32(v) for v in rng.random(40)] + [np.float32(0.29), np.float32(0.5)]
        for j in rng.integers(1, n, 40):
            f = np.float32(j / n)
            vals += [f, np.nextafter(f, np.float32(2)), np.nextafter(f, np.float32(-1))]
        vals = np.clip(np.array(vals, np.float32), 0, 1)
        got = np.asarray(jax.jit(counts.exact_floor, static_argnums=1)(vals, (n,)))
        np.testing.assert_array_equal(got, [_host_floor(v, n) for v in vals], err_msg=str(n))
        # float32 arithmetic alone gets some of them wrong: the test can fail
        if n > 1000:
            assert np.any(np.floor(vals * np.float32(n)) != [_host_floor(v, n) for v in vals])


def test_traced_density_with_floor_count_equals_eager():
    base, fts = real_looking(5, SHAPES["proj"])
    taus = jnp.asarray(np.stack([f - base for f in fts]))
    f = jax.jit(lambda w, d: M.ties(taus, w, d, count="floor"))
    got = f(jnp.asarray(WEIGHTS), jnp.asarray(DENSITIES, jnp.float32))
    eager = M.ties(taus, WEIGHTS, [float(np.float32(d)) for d in DENSITIES], count="floor")
    np.testing.assert_array_equal(np.asarray(got) == 0, np.asarray(eager) == 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(eager), rtol=1e-6, atol=0)
