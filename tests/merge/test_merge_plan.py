"""`merge_planned`: N:M and refit through a plan, the method facts it reads from the spec table.

Expectations are independent: the float64 OBS oracle (tests/helpers/oracle.py), a
NumPy TIES (sign election on the weighted vectors, disjoint weighted mean),
the N:M pattern, and refit's invariant (same mask, never a larger error).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgtv_jax.merge.plan import MergeInfo, ObsOptions, PlanError, TensorPlan, merge_planned
from sgtv_jax.merge.trim import Calibration
from tests.helpers import oracle


def _problem(tasks=2, rows=12, cols=32, seed=0):
    rng = np.random.default_rng(seed)
    x = oracle.correlated_inputs(rng, 4 * cols, cols)
    h = 2 * x.T @ x / 4
    d = rng.standard_normal((tasks, rows, cols))
    return d, h


def _ties(trimmed: np.ndarray, w: np.ndarray) -> np.ndarray:
    """TIES' sign election and weighted disjoint mean, float64 (a zero divisor counts as 1)."""
    wt = w[:, None, None] * trimmed
    sign = np.where(wt.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(wt) == sign) & (trimmed != 0)
    num = (agree * wt).sum(0)
    den = (agree * w[:, None, None]).sum(0)
    return num / np.where(den == 0, 1.0, den)


def _quad(e: np.ndarray, h: np.ndarray) -> float:
    return float(np.sum((e @ h) * e))


def test_two_four_through_the_plan_matches_the_oracle_then_ties():
    d, h = _problem()
    w = np.array([1.0, 0.5])
    plan = TensorPlan(
        "ties",
        "layer.weight",
        weights=tuple(w),
        densities=(1.0, 1.0),
        trim="sparsegpt",
        obs=ObsOptions(blocksize=8, prunen=2, prunem=4),
    )
    with jax.enable_x64(True):
        merged, trimmed, info = merge_planned(plan, jnp.asarray(d), Calibration(hessian=jnp.asarray(h)))
        merged, trimmed = np.asarray(merged), np.asarray(trimmed)
    assert info == MergeInfo("sparsegpt", 0.01)
    for t in range(2):
        q, mask, _ = oracle.obs_prune(d[t], h, prunen=2, prunem=4, blocksize=8)
        np.testing.assert_array_equal(trimmed[t] == 0, mask)
        np.testing.assert_allclose(trimmed[t], q, rtol=1e-9, atol=1e-9)
        assert np.all((trimmed[t] != 0).reshape(12, -1, 4).sum(-1) == 2)
    np.testing.assert_allclose(merged, _ties(trimmed, w), rtol=1e-12, atol=1e-12)


def test_refit_through_the_plan_keeps_the_mask_and_lowers_the_error():
    d, h = _problem(seed=1)
    calib = Calibration(hessian=jnp.asarray(h, jnp.float32))
    out = {}
    for refit in (False, True):
        plan = TensorPlan(
            "task_arithmetic",
            "w",
            weights=(1.0, 1.0),
            densities=(0.3, 0.3),
            trim="sparsegpt",
            obs=ObsOptions(blocksize=16, refit=refit),
        )
        out[refit] = np.asarray(merge_planned(plan, jnp.asarray(d, jnp.float32), calib)[1], np.float64)
    np.testing.assert_array_equal(out[True] == 0, out[False] == 0)
    errs = {r: [_quad(out[r][t] - d[t], h) for t in range(2)] for r in out}
    assert all(e1 <= e0 * (1 + 1e-5) for e0, e1 in zip(errs[False], errs[True]))
    assert any(e1 < 0.99 * e0 for e0, e1 in zip(errs[False], errs[True]))


def test_default_trim_and_rescale_come_from_the_spec_table():
    """dare_linear's own trim is random with 1/density rescale; survivors are d / density, summed."""
    d, _ = _problem(seed=2)
    plan = TensorPlan("dare_linear", "x", weights=(1.0, 1.0), densities=(0.5, 0.25), seed=5)
    merged, trimmed, info = merge_planned(plan, jnp.asarray(d, jnp.float32))
    trimmed = np.asarray(trimmed)
    assert info == MergeInfo("random", None)
    for t, dens in enumerate((0.5, 0.25)):
        kept = trimmed[t] != 0
        np.testing.assert_allclose(trimmed[t][kept], d[t][kept] / dens, rtol=1e-6)
        assert abs(kept.mean() - dens) < 0.15
    np.testing.assert_allclose(np.asarray(merged), trimmed.sum(0), rtol=1e-6, atol=1e-6)


def test_density_below_one_without_a_trim_names_the_tensor():
    plan = TensorPlan("task_arithmetic", "blk.0.norm", weights=(1.0,), densities=(0.5,))
    with pytest.raises(PlanError, match="'blk.0.norm'.*does not trim by itself"):
        merge_planned(plan, jnp.ones((1, 4)))


def test_sparsegpt_without_a_hessian_names_the_tensor():
    plan = TensorPlan("ties", "blk.0.q.weight", weights=(1.0,), densities=(0.5,), trim="sparsegpt")
    with pytest.raises(PlanError, match="blk.0.q.weight"):
        merge_planned(plan, jnp.ones((1, 4, 4)))


def test_linear_without_normalize_sums_whole_models_from_the_base():
    """sum_t w_t theta_t in task-vector form: (sum_t w_t - 1) theta_0 + sum_t w_t tau_t."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((4, 6))
    thetas = base + rng.standard_normal((2, 4, 6))
    plan = TensorPlan("linear", "w", weights=(0.5, 2.0), densities=(1.0, 1.0), params={"normalize": False})
    with jax.enable_x64(True):
        merged, _, info = merge_planned(plan, jnp.asarray(thetas - base), base=jnp.asarray(base))
        merged = np.asarray(merged)
    np.testing.assert_allclose(base + merged, 0.5 * thetas[0] + 2.0 * thetas[1], rtol=1e-12, atol=1e-12)
    assert info == MergeInfo(None, None)
    with pytest.raises(PlanError, match="needs the base tensor of 'w'"):
        merge_planned(plan, jnp.asarray(thetas - base))
