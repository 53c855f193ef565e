"""Balanced and task-vector-augmented Grams (gram_norm, proxy_gram) in every Hessian fit, against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgtv_jax.merge import gram_balance as gb
from sgtv_jax.merge import hessian_fit as hf
from sgtv_jax.merge.regmean import regmean
from tests.helpers import oracle
from tests.merge.test_hessian_fit import IN, T, W, np_lstsq_coefficients, np_magnitude, np_regmean, problem

MODES = ("none", "trace", "energy")


def np_norm(m, d, mode):
    """m / c(m) for one task (task vector d `[out, in]`), from the definitions; a zero normaliser: zeros."""
    c = {"none": 1.0, "trace": np.trace(m) / m.shape[0], "energy": np.sum((d @ m) * d)}[mode]
    return m / c if c > 0 else np.zeros_like(m)


def np_augmented(g, d, mode, beta):
    """[T, in, in]: each task's normalised data Gram plus beta times its normalised proxy D^T D / ||D||^2."""
    out = []
    for t in range(len(d)):
        sq = np.sum(d[t] ** 2)
        p = d[t].T @ d[t] / sq if sq > 0 else np.zeros_like(g[t])
        out.append(np_norm(g[t], d[t], mode) + beta * np_norm(p, d[t], mode))
    return np.stack(out)


def scaled_problem(seed):
    """`problem` with task 0's inputs 10x louder: its Gram 100x the others'."""
    d, x, g = problem(seed)
    x[0] *= 10.0
    g[0] *= 100.0
    return d, x, g


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_regmean_is_the_closed_form_on_the_augmented_grams(mode, beta):
    d, _, g = scaled_problem(0)
    with jax.enable_x64(True):
        got = np.asarray(regmean(d, W, grams=g, alpha=0.9, gram_norm=mode, proxy_gram=beta))
    np.testing.assert_allclose(got, np_regmean(d, np_augmented(g, d, mode, beta), W, 0.9), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ["trace", "energy"])
def test_balanced_grams_have_unit_normalisers(mode):
    d, _, g = scaled_problem(1)
    with jax.enable_x64(True):
        b = np.asarray(gb.balance_grams(jnp.asarray(g), jnp.asarray(d), mode))
    for t in range(T):
        got = np.trace(b[t]) / IN if mode == "trace" else np.sum((d[t] @ b[t]) * d[t])
        assert got == pytest.approx(1.0, rel=1e-12)
        np.testing.assert_allclose(b[t], np_norm(g[t], d[t], mode), rtol=1e-12)


def test_none_and_zero_hand_the_grams_through_untouched():
    """The bit-identical path: the fits see the very array they were given."""
    d, _, g = problem(2)
    gj, dj = jnp.asarray(g), jnp.asarray(d)
    assert gb.augmented_grams(gj, dj, "none", 0.0) is gj
    assert gb.augmented_grams(gj, dj) is gj
    assert hf._fit_grams(gj, dj, "none", 0.0, None) is gj


@pytest.mark.parametrize("mode", MODES)
def test_every_fit_reads_the_augmented_grams(mode):
    """lstsq, regmean_trim, regmean_sparse: the untrimmed task vectors define normalisers and proxies."""
    d, x, g = scaled_problem(3)
    aug = np_augmented(g, d, mode, 0.7)
    p = np.stack([np_magnitude(d[t], 0.3) for t in range(T)])
    opts = dict(gram_norm=mode, proxy_gram=0.7)
    with jax.enable_x64(True):
        got_ls = np.asarray(hf.lstsq(d, W, 0.3, trim="magnitude", grams=g, **opts))
        got_rt = np.asarray(hf.regmean_trim(d, W, 0.3, trim="magnitude", grams=g, **opts))
        got_rs = np.asarray(hf.regmean_sparse(d, W, 0.3, trim="sparsegpt", grams=g, alpha=1.0, blocksize=4, **opts))
        # the pipeline's call: trimmed inputs, the untrimmed ones as targets
        via_targets = np.asarray(hf.regmean_trim(p, W, 1.0, trim=None, grams=g, targets=d, **opts))
    lam = np.linalg.solve(  # the T x T normal equations of sum_s lambda_s P_s against the augmented Grams
        np.array(
            [[sum(W[t] * np.trace(p[s] @ aug[t] @ p[r].T) for t in range(T)) for r in range(T)] for s in range(T)]
        ),
        np.array([sum(W[t] * np.trace(p[s] @ aug[t] @ d[t].T) for t in range(T)) for s in range(T)]),
    )
    np.testing.assert_allclose(got_ls, np.einsum("s,soi->oi", lam, p), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got_rt, np_regmean(p, aug, W, 0.9), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(via_targets, got_rt, rtol=1e-12, atol=1e-14)
    # regmean_sparse: OBS of the augmented optimum against the sum of the augmented Grams
    s = sum(W[t] * aug[t] for t in range(T))
    want = oracle.obs_prune(np_regmean(d, aug, W, 1.0), s, density=0.3, blocksize=4)[0]
    np.testing.assert_allclose(got_rs, want, rtol=1e-7, atol=1e-8)
    if mode == "none":  # lstsq's reference, independently: the stacked problem with X_t = [X_t, sqrt(beta) D_t^T/|D_t|]
        xa = [np.concatenate([x[t], np.sqrt(0.7) * d[t].T / np.linalg.norm(d[t])], 1) for t in range(T)]
        want_ls = np.einsum("s,soi->oi", np_lstsq_coefficients(p, d, xa, W), p)
        np.testing.assert_allclose(got_ls, want_ls, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["none", "trace"])
def test_large_beta_approaches_wudis_closed_form(mode):
    """beta -> inf: M -> M* = (sum_t D_t P_t)(sum_t P_t)^-1 (alpha 1, WUDI's loss's minimiser).

    With A = sum_t P_t and the data as the proxies see them, A_G = sum_t s_t G_t, B_G = sum_t s_t D_t G_t
    (s_t = 1 for none, c_t(P_t) / c_t(G_t) for trace), M(beta) = (B + B_G / beta)(A + A_G / beta)^-1, so
    M(beta) - M* = E / beta + O(1 / beta^2) with E = (B_G - M* A_G) A^-1; the relative size of the
    second-order term is at most kappa / beta, kappa = ||A_G|| ||A^-1||.
    """
    d, _, g = scaled_problem(4)
    p = np.stack([d[t].T @ d[t] / np.sum(d[t] ** 2) for t in range(T)])
    a, b = p.sum(0), np.einsum("toi,tij->oj", d, p)
    star = np.linalg.solve(a, b.T).T
    s = [np.trace(p[t]) / np.trace(g[t]) if mode == "trace" else 1.0 for t in range(T)]
    ag, bg = sum(s[t] * g[t] for t in range(T)), sum(s[t] * d[t] @ g[t] for t in range(T))
    ainv = np.linalg.inv(a)
    kappa = np.linalg.norm(ag, 2) * np.linalg.norm(ainv, 2)
    e = np.linalg.norm((bg - star @ ag) @ ainv, 2)
    for k in (1e2, 1e4):
        beta = k * kappa
        with jax.enable_x64(True):
            got = np.asarray(regmean(d, [1.0] * T, grams=g, alpha=1.0, gram_norm=mode, proxy_gram=beta))
        err = np.linalg.norm(got - star, 2)
        assert err == pytest.approx(e / beta, rel=2 * kappa / beta)


@pytest.mark.parametrize("mode", MODES)
def test_a_task_without_data_fits_its_proxy_alone_and_never_nans(mode):
    d, _, g = scaled_problem(5)
    g[1] = 0.0  # model 1 had no calibration data
    with jax.enable_x64(True):
        for beta in (0.0, 0.5):
            got = np.asarray(regmean(d, W, grams=g, alpha=0.9, gram_norm=mode, proxy_gram=beta))
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, np_regmean(d, np_augmented(g, d, mode, beta), W, 0.9), rtol=1e-9)
        if mode != "none":  # beta 0: task 1 drops out, the fit of tasks 0 and 2 alone
            got = np.asarray(regmean(d, W, grams=g, alpha=0.9, gram_norm=mode))
            keep = [0, 2]
            want = np_regmean(d[keep], np_augmented(g, d, mode, 0.0)[keep], [W[0], W[2]], 0.9)
            np.testing.assert_allclose(got, want, rtol=1e-9)
        # no data at all, beta 0: every input is dead, the weighted mean (RegMean's rule)
        zero = np.asarray(regmean(d, W, grams=np.zeros_like(g), gram_norm=mode))
        np.testing.assert_allclose(zero, np.einsum("t,toi->oi", np.asarray(W), d) / sum(W), rtol=1e-12)


def test_energy_drops_a_task_whose_vector_is_zero():
    d, _, g = scaled_problem(6)
    d[2] = 0.0
    with jax.enable_x64(True):
        got = np.asarray(hf.lstsq(d, W, 1.0, trim=None, grams=g, gram_norm="energy", proxy_gram=1.0))
        assert np.all(np.isfinite(got))


def test_traced_beta_matches_the_eager_fit():
    d, _, g = scaled_problem(7)
    with jax.enable_x64(True):
        fit = jax.jit(lambda beta: regmean(d, W, grams=g, gram_norm="trace", proxy_gram=beta))
        eager = np.asarray(regmean(d, W, grams=g, gram_norm="trace", proxy_gram=0.3))
        np.testing.assert_allclose(np.asarray(fit(0.3)), eager, rtol=1e-12)
        assert np.all(np.isnan(np.asarray(fit(-1.0))))  # a bad traced value is never a silent merge


@pytest.mark.parametrize("fn", [regmean, hf.lstsq, hf.regmean_trim, hf.regmean_sparse])
def test_bad_options_name_the_option_and_tensor(fn):
    d, _, g = problem(8)
    with pytest.raises(ValueError, match=r"unknown gram_norm 'foo'.*layers\.0\.q"):
        fn(d, W, grams=g, gram_norm="foo", name="layers.0.q")
    with pytest.raises(ValueError, match=r"proxy_gram must be a number >= 0, got -1"):
        fn(d, W, grams=g, proxy_gram=-1)
