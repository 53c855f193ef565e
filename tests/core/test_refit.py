"""OBS + refit against a float64 per-row direct-solve oracle, and its invariants."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sgtv_jax import SparseGPTTaskVector, obs_prune
from sgtv_jax.refit import refit_kept
from tests.helpers import oracle


def problem(rows, cols, seed, ill=False):
    rng = np.random.default_rng(seed)
    x = oracle.correlated_inputs(rng, 3 * cols, cols)
    if ill:
        x = x * np.logspace(-3, 0, cols)
    return rng.standard_normal((rows, cols)), 2 * x.T @ x / 4, x.T


@pytest.mark.parametrize("ill", [False, True])
@pytest.mark.parametrize("kw", [dict(density=0.2), dict(density=0.6), dict(density=None, prunen=2, prunem=4)])
def test_converged_refit_matches_direct_solve_x64(kw, ill):
    d, h, _ = problem(24, 96, seed=1, ill=ill)
    with jax.enable_x64(True):
        obs, _ = obs_prune(d, h, blocksize=32, **kw)
        ref, _ = obs_prune(d, h, blocksize=32, refit=True, refit_tol=1e-12, refit_maxiter=500, **kw)
        obs, ref = np.asarray(obs), np.asarray(ref)
    keep = obs != 0
    np.testing.assert_array_equal(ref != 0, keep)  # the mask is kept exactly
    want = oracle.masked_least_squares(d, h, keep)
    assert np.max(np.abs(ref - want)) <= 1e-6 * np.max(np.abs(want))
    assert oracle.weighted_error(d, ref, h) <= oracle.weighted_error(d, obs, h)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ill", [False, True])
def test_refit_never_worse_than_obs(seed, ill):
    d, h, x = problem(32, 128, seed=seed, ill=ill)
    d32, h32 = d.astype(np.float32), h.astype(np.float32)
    for density in (0.1, 0.3, 0.5):
        obs = np.asarray(obs_prune(d32, h32, density=density)[0], np.float64)
        ref = np.asarray(obs_prune(d32, h32, density=density, refit=True)[0], np.float64)
        assert np.all(ref[obs == 0] == 0)
        assert oracle.weighted_error(d, ref, h) <= oracle.weighted_error(d, obs, h) * (1 + 1e-5)
        assert np.linalg.norm((d - ref) @ x) <= np.linalg.norm((d - obs) @ x) * (1 + 1e-5)


def test_empty_rows_and_dead_columns_stay_zero():
    d, h, _ = problem(8, 64, seed=5)
    h[:, [3, 40]] = 0
    h[[3, 40], :] = 0
    keep = np.ones_like(d, dtype=bool)
    keep[2] = False  # a row with no kept entries
    d_dead = d.copy()
    d_dead[:, [3, 40]] = 0
    a = h.copy()
    a[[3, 40], [3, 40]] = 1
    a += 0.01 * np.mean(np.diag(a)) * np.eye(64)
    with jax.enable_x64(True):
        out, _ = refit_kept(d_dead[None], d_dead[None] * keep, keep[None], a, tol=1e-12, maxiter=300)
        out = np.asarray(out[0])
    assert np.all(out[2] == 0)
    assert np.all(np.abs(out[:, [3, 40]]) < 1e-12)
    full = obs_prune(d, h, density=0.5, refit=True)[0]
    assert np.all(np.asarray(full)[:, [3, 40]] == 0)


def test_batched_equals_looped_shared_and_per_task():
    rows, cols = 12, 64
    ps = [problem(rows, cols, seed=s) for s in range(3)]
    stack = np.stack([p[0] for p in ps]).astype(np.float32)
    hs = np.stack([p[1] for p in ps]).astype(np.float32)
    for hess in (hs[0], hs):
        batched, _ = obs_prune(stack, hess, density=0.3, blocksize=32, refit=True)
        for t in range(3):
            one, _ = obs_prune(stack[t], hess if hess.ndim == 2 else hess[t], density=0.3, blocksize=32, refit=True)
            np.testing.assert_allclose(np.asarray(batched[t]), np.asarray(one), rtol=1e-4, atol=1e-6)


def test_seed_api_refit():
    d, h, x = problem(16, 64, seed=8)
    pruner = SparseGPTTaskVector((16, 64))
    pruner.add_batch(x.T.astype(np.float32))
    plain = np.asarray(pruner.fasterprune(d, 0.3))
    refit = np.asarray(pruner.fasterprune(d, 0.3, refit=True))
    np.testing.assert_array_equal(plain == 0, refit == 0)
    assert np.linalg.norm((d - refit) @ x) < np.linalg.norm((d - plain) @ x)


def test_merge_methods_take_refit():
    from sgtv_jax.merge import Calibration, ties

    d, h, x = problem(16, 64, seed=9)
    stack = np.stack([d, -0.5 * d + 0.1]).astype(np.float32)
    calib = Calibration(hessian=h.astype(np.float32))
    plain = ties(stack, [1.0, 1.0], 0.3, trim="sparsegpt", calib=calib)
    refit = ties(stack, [1.0, 1.0], 0.3, trim="sparsegpt", calib=calib, refit=True)
    # refit changes kept values; the trimmed stacks it merged are each closer to their task
    assert not np.allclose(np.asarray(plain), np.asarray(refit))
    with pytest.raises(ValueError, match="refit needs the Hessian"):
        ties(stack, [1.0, 1.0], 0.3, trim="sparsegpt", calib=Calibration(hessian_inv=np.linalg.inv(h)), refit=True)


# The default refit (tol 1e-4, 20 CG iterations) against the exact float64
# masked least squares: the share of the exact refit's gain over OBS it leaves
# on the table, at most REFIT_GAP_X64 in float64 and REFIT_GAP_F32 in float32.
# Measured when written: worst 0.30 % (float64) and 1.14 % (float32), both at
# density 0.5, where the kept sets are largest and CG converges slowest; any
# faster refit must still pass this.
REFIT_GAP_X64 = 5e-3
REFIT_GAP_F32 = 2e-2


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("ill", [False, True])
@pytest.mark.parametrize(
    "kw", [dict(density=0.1), dict(density=0.3), dict(density=0.5), dict(density=None, prunen=2, prunem=4)]
)
def test_default_refit_within_stated_gap_of_exact(kw, ill, x64):
    gaps = []
    for seed in range(2):
        d, h, _ = problem(32, 128, seed=seed, ill=ill)
        with jax.enable_x64(x64):
            dd, hh = (d, h) if x64 else (d.astype(np.float32), h.astype(np.float32))
            obs = np.asarray(obs_prune(dd, hh, **kw)[0], np.float64)
            ref = np.asarray(obs_prune(dd, hh, refit=True, **kw)[0], np.float64)
        np.testing.assert_array_equal(ref != 0, obs != 0)
        exact = oracle.masked_least_squares(d, h, obs != 0)
        f_obs, f_ref, f_exact = (oracle.weighted_error(d, x, h) for x in (obs, ref, exact))
        assert f_exact < f_obs  # the oracle improves on OBS, so the share is well defined
        gaps.append((f_ref - f_exact) / (f_obs - f_exact))
    assert max(gaps) <= (REFIT_GAP_X64 if x64 else REFIT_GAP_F32), gaps
