"""Hessian-optimal combination (lstsq, regmean_trim, regmean_sparse) against float64 NumPy references."""

import jax
import numpy as np
import pytest

from sgtv_jax.merge import hessian_fit as hf
from sgtv_jax.merge.plan import ObsOptions, TensorPlan, merge_planned
from sgtv_jax.merge.trim import Calibration
from tests.helpers import oracle

T, OUT, IN, N = 3, 6, 10, 40


def problem(seed=0, tasks=T):
    """Task vectors D_t `[T, out, in]`, inputs X_t `[T, in, n]` (correlated columns), Grams X X^T."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((tasks, OUT, IN))
    mix = rng.standard_normal((IN, IN))
    x = np.einsum("ij,tjn->tin", mix, rng.standard_normal((tasks, IN, N)))
    return d, x, np.einsum("tin,tjn->tij", x, x)


def np_magnitude(d, density):
    flat = np.abs(d).reshape(-1)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[: int(round(density * flat.size))]] = True
    return np.where(keep.reshape(d.shape), d, 0.0)


def objective(m, d, x, w):
    """sum_t w_t ||(M - D_t) X_t||_F^2, from the definition."""
    return sum(w[t] * np.sum(((m - d[t]) @ x[t]) ** 2) for t in range(len(d)))


def np_lstsq_coefficients(p, d, x, w):
    """argmin_lambda of the objective as one stacked least-squares problem (no traces, no Grams)."""
    cols = np.concatenate(
        [np.stack([np.sqrt(w[t]) * (p[s] @ x[t]).ravel() for s in range(len(p))], 1) for t in range(len(d))]
    )
    rhs = np.concatenate([np.sqrt(w[t]) * (d[t] @ x[t]).ravel() for t in range(len(d))])
    return np.linalg.lstsq(cols, rhs, rcond=None)[0]


def np_regmean(p, gt, w, alpha):
    """(sum_t w_t P_t G~_t)(sum_t w_t G~_t)^-1 with G~ = alpha G + (1 - alpha) diag(G)."""
    gt = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gt]
    num = sum(w[t] * p[t] @ gt[t] for t in range(len(p)))
    return np.linalg.solve(sum(w[t] * gt[t] for t in range(len(p))), num.T).T


W = [1.0, 0.7, 1.4]


def test_lstsq_coefficients_match_the_stacked_least_squares_problem():
    d, x, g = problem()
    p = np.stack([np_magnitude(d[t], 0.3) for t in range(T)])
    with jax.enable_x64(True):
        lam = np.asarray(hf.lstsq_coefficients(p, d, g, W))
    np.testing.assert_allclose(lam, np_lstsq_coefficients(p, d, x, W), rtol=1e-9, atol=1e-10)


def test_lstsq_method_is_the_fitted_combination_and_beats_the_weights():
    d, x, g = problem(1)
    with jax.enable_x64(True):
        got = np.asarray(hf.lstsq(d, W, 0.2, trim="magnitude", grams=g))
    p = np.stack([np_magnitude(d[t], 0.2) for t in range(T)])
    lam = np_lstsq_coefficients(p, d, x, W)
    np.testing.assert_allclose(got, np.einsum("s,soi->oi", lam, p), rtol=1e-9, atol=1e-10)
    at_weights = np.einsum("s,soi->oi", np.asarray(W), p)
    at_mean = at_weights / sum(W)
    assert objective(got, d, x, W) <= objective(at_weights, d, x, W)
    assert objective(got, d, x, W) <= objective(at_mean, d, x, W)


def test_lstsq_float32_agrees_with_the_float64_reference():
    d, x, g = problem(2)
    got = np.asarray(hf.lstsq(d.astype(np.float32), W, 0.3, trim="magnitude", grams=g.astype(np.float32)))
    p = np.stack([np_magnitude(d[t].astype(np.float32).astype(np.float64), 0.3) for t in range(T)])
    want = np.einsum("s,soi->oi", np_lstsq_coefficients(p, d, x, W), p)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_one_untrimmed_task_gets_coefficient_one():
    d, _, g = problem(3, tasks=1)
    with jax.enable_x64(True):
        lam = np.asarray(hf.lstsq_coefficients(d, d, g, [0.3]))
        merged = np.asarray(hf.lstsq(d, [0.3], trim=None, grams=g))
    np.testing.assert_allclose(lam, [1.0], rtol=1e-12)
    np.testing.assert_allclose(merged, d[0], rtol=1e-10, atol=1e-12)


def test_degenerate_directions_keep_the_weighted_mean_coefficients():
    """A zero task vector and an exact duplicate leave directions the data cannot fix."""
    d, x, g = problem(4)
    p = d.copy()
    p[2] = 0.0
    with jax.enable_x64(True):
        lam = np.asarray(hf.lstsq_coefficients(p, d, g, W))
    assert lam[2] == pytest.approx(W[2] / sum(W), rel=1e-9)
    np.testing.assert_allclose(lam[:2], np_lstsq_coefficients(p[:2], d, x, W), rtol=1e-8)
    p[1] = p[0]
    with jax.enable_x64(True):
        lam = np.asarray(hf.lstsq_coefficients(p, d, g, W))
    # the pair's total is fitted; its split is the start's (equal weights' difference kept)
    total = np_lstsq_coefficients(p[:1], d, x, W)[0]
    assert lam[0] + lam[1] == pytest.approx(total, rel=1e-8)
    assert lam[0] - lam[1] == pytest.approx((W[0] - W[1]) / sum(W), rel=1e-8)


def test_lstsq_sign_election_fits_the_masked_vectors():
    d, x, g = problem(5)
    p = np.stack([np_magnitude(d[t], 0.5) for t in range(T)])
    wd = np.asarray(W)[:, None, None] * p
    elected = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    pm = p * (np.sign(wd) == elected)
    with jax.enable_x64(True):
        got = np.asarray(hf.lstsq(d, W, 0.5, trim="magnitude", sign_election="sum", grams=g))
    np.testing.assert_allclose(got, np.einsum("s,soi->oi", np_lstsq_coefficients(pm, d, x, W), pm), rtol=1e-9)


def test_without_grams_every_fit_is_the_weighted_mean_of_its_trimmed_inputs():
    d, _, _ = problem(6)
    p = np.stack([np_magnitude(d[t], 0.4) for t in range(T)])
    want = np.einsum("s,soi->oi", np.asarray(W), p) / sum(W)
    with jax.enable_x64(True):
        for fn in (hf.lstsq, hf.regmean_trim):
            np.testing.assert_allclose(np.asarray(fn(d, W, 0.4)), want, rtol=1e-12)
            summed = np.asarray(fn(d, W, 0.4, no_gram="sum"))  # task arithmetic of the trimmed inputs
            np.testing.assert_allclose(summed, want * sum(W), rtol=1e-12)
        mean = np.einsum("s,soi->oi", np.asarray(W), d) / sum(W)
        for no_gram, scale in (("mean", 1.0), ("sum", sum(W))):  # regmean_sparse: the combine, then the trim
            got = np.asarray(hf.regmean_sparse(d, W, 0.4, no_gram=no_gram))
            np.testing.assert_allclose(got, np_magnitude(mean * scale, 0.4), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown no_gram"):
        hf.lstsq(d, W, 0.4, no_gram="max")


def test_no_gram_leaves_tensors_with_grams_to_the_fit():
    d, _, g = problem(9)
    with jax.enable_x64(True):
        for fn in (hf.lstsq, hf.regmean_trim, hf.regmean_sparse):
            a = np.asarray(fn(d, W, 0.5, grams=g))
            np.testing.assert_array_equal(np.asarray(fn(d, W, 0.5, grams=g, no_gram="sum")), a)


@pytest.mark.parametrize("alpha", [1.0, 0.9])
def test_regmean_trim_solves_regmean_on_the_trimmed_vectors(alpha):
    d, x, g = problem(7)
    p = np.stack([np_magnitude(d[t], 0.3) for t in range(T)])
    with jax.enable_x64(True):
        got = np.asarray(hf.regmean_trim(d, W, 0.3, trim="magnitude", grams=g, alpha=alpha))
    np.testing.assert_allclose(got, np_regmean(p, g, W, alpha), rtol=1e-9, atol=1e-10)
    if alpha == 1.0:  # = argmin_M sum_t w_t ||(M - P_t) X_t||^2, as a stacked least-squares problem
        lhs = np.concatenate([np.sqrt(W[t]) * x[t].T for t in range(T)])
        rhs = np.concatenate([np.sqrt(W[t]) * (p[t] @ x[t]).T for t in range(T)])
        np.testing.assert_allclose(got, np.linalg.lstsq(lhs, rhs, rcond=None)[0].T, rtol=1e-8)


def test_regmean_trim_with_obs_uses_the_obs_trimmed_vectors():
    d, _, g = problem(8)
    p = np.stack([oracle.obs_prune(d[t], g[t], density=0.3, blocksize=4)[0] for t in range(T)])
    with jax.enable_x64(True):
        got = np.asarray(hf.regmean_trim(d, W, 0.3, trim="sparsegpt", grams=g, calib=Calibration(g), blocksize=4))
    np.testing.assert_allclose(got, np_regmean(p, g, W, 0.9), rtol=1e-7, atol=1e-8)


def test_regmean_sparse_is_obs_of_the_optimum_on_the_summed_gram():
    d, x, g = problem(9)
    dens = [0.2, 0.3, 0.4]
    with jax.enable_x64(True):
        got = np.asarray(hf.regmean_sparse(d, W, dens, trim="sparsegpt", grams=g, alpha=1.0, blocksize=4))
    star = np_regmean(d, g, W, 1.0)
    s = sum(W[t] * g[t] for t in range(T))
    want = oracle.obs_prune(star, s, density=0.3, blocksize=4)[0]
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)
    assert np.mean(got != 0) == pytest.approx(0.3)
    # f(M) = f(M*) + ||M - M*||_S^2: the OBS loss on S is the merge objective's excess
    excess = np.trace((got - star) @ s @ (got - star).T)
    assert objective(got, d, x, W) == pytest.approx(objective(star, d, x, W) + excess, rel=1e-9)
    # and it beats trimming the optimum by magnitude at the same density
    assert objective(got, d, x, W) < objective(np_magnitude(star, 0.3), d, x, W)


def test_merge_planned_passes_grams_targets_and_the_merged_trim():
    d, x, g = problem(10)
    base = dict(name="model.layers.0.mlp.up_proj.weight", weights=tuple(W), densities=(0.3,) * T)
    with jax.enable_x64(True):
        calib = Calibration(hessian=g)
        plan = TensorPlan("lstsq", trim="sparsegpt", obs=ObsOptions(blocksize=4), **base)
        merged, trimmed, info = merge_planned(plan, d, calib)
        trimmed = np.asarray(trimmed)
        lam = np_lstsq_coefficients(trimmed, d, x, W)
        np.testing.assert_allclose(np.asarray(merged), np.einsum("s,soi->oi", lam, trimmed), rtol=1e-8)
        assert info.trim == "sparsegpt" and np.mean(trimmed != 0) == pytest.approx(0.3)

        plan = TensorPlan("regmean_sparse", trim="sparsegpt", obs=ObsOptions(blocksize=4), **base)
        merged, trimmed, info = merge_planned(plan, d, calib)
        s = sum(W[t] * (0.9 * g[t] + 0.1 * np.diag(np.diag(g[t]))) for t in range(T))
        want = oracle.obs_prune(np_regmean(d, g, W, 0.9), s, density=0.3, blocksize=4)[0]
        np.testing.assert_allclose(np.asarray(merged), want, rtol=1e-7, atol=1e-8)
        np.testing.assert_array_equal(np.asarray(trimmed), d)


def test_bad_grams_name_the_tensor():
    d, _, g = problem(11)
    with pytest.raises(ValueError, match=r"grams must have shape.*layers\.3\.q"):
        hf.lstsq(d, W, grams=g[:, :4, :4], trim=None, name="layers.3.q")
    with pytest.raises(ValueError, match="unknown sign_election 'max'"):
        hf.lstsq(d, W, grams=g, sign_election="max")
    with pytest.raises(ValueError, match="need a trim"):
        hf.lstsq(d, W, 0.5, trim=None, grams=g)
