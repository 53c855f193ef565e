"""Merge methods against a plain float64 NumPy reference, hand-worked cases, invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sgtv_jax.merge as M
from sgtv_jax.merge import trim


def rng_stack(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------- NumPy reference


def np_magnitude(d, density):
    flat = np.abs(d).reshape(-1)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[: int(round(density * flat.size))]] = True
    return np.where(keep.reshape(d.shape), d, 0.0)


def np_merge(trimmed, weights, consensus=None, normalize=False, lam=1.0):
    """mergekit's combine, written plainly in float64."""
    x = np.asarray(trimmed, np.float64)
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    wd = w * x
    if consensus is None:
        mixed = wd.sum(0)
        div = w.sum()
        if abs(div) < 1e-8:
            div = 1.0
    else:
        vote = wd.sum(0) if consensus == "sum" else np.sign(wd).sum(0)
        elected = np.where(vote >= 0, 1.0, -1.0)
        m = np.sign(wd) == elected
        mixed = (wd * m).sum(0)
        div = (w * m).sum(0)
        div = np.where(div == 0, 1.0, div)
    if normalize:
        mixed = mixed / div
    return lam * mixed


def close(a, b, tol=2e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# ----------------------------------------------------------------- vs reference

D = rng_stack(0, (3, 8, 12))
W = [0.7, 1.3, -0.4]
DENS = [0.3, 0.5, 0.9]


def test_linear():
    close(M.linear(D, W), np_merge(D, W, normalize=True))
    base = rng_stack(1, (8, 12))
    models = D + base
    expected = (np.asarray(W)[:, None, None] * models).sum(0) - base  # sum w theta_t - theta_0
    close(M.linear(D, W, normalize=False, base=base), expected, 1e-5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_task_arithmetic(normalize, lam):
    close(M.task_arithmetic(D, W, normalize=normalize, lambda_=lam), np_merge(D, W, None, normalize, lam))


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties(consensus, normalize):
    trimmed = np.stack([np_magnitude(D[t], DENS[t]) for t in range(3)])
    got = M.ties(D, W, DENS, consensus=consensus, normalize=normalize, lambda_=0.8)
    close(got, np_merge(trimmed, W, consensus, normalize, 0.8))


def test_magnitude_linear_is_the_magnitude_trim_then_a_weighted_sum():
    """The row added by following CONTRIBUTING.md: TIES' trim, no election, `lambda * sum_t w_t tau'_t`."""
    trimmed = np.stack([np_magnitude(D[t], DENS[t]) for t in range(3)])
    close(M.magnitude_linear(D, W, DENS), np_merge(trimmed, W))
    close(M.magnitude_linear(D, W, DENS, normalize=True, lambda_=0.6), np_merge(trimmed, W, None, True, 0.6))
    close(M.magnitude_linear(D, W, DENS, rescale=True), np_merge(trimmed / np.reshape(DENS, (3, 1, 1)), W), 1e-5)
    # by hand: density 0.5 of [3, -1, 2, 0.5] keeps 3 and 2; weights 2 and 1
    hand = np.asarray([[3.0, -1.0, 2.0, 0.5], [-4.0, 1.0, 0.0, 1.5]], np.float32)
    np.testing.assert_array_equal(np.asarray(M.magnitude_linear(hand, [2.0, 1.0], 0.5)), [2.0, 0.0, 4.0, 1.5])
    with pytest.raises(TypeError, match="consensus"):
        M.magnitude_linear(D, W, DENS, consensus="sum")  # no sign election: not a keyword


def test_ties_default_density_is_untrimmed():
    close(M.ties(D, W), np_merge(D, W, "sum", True))


def test_task_arithmetic_with_trim_and_rescale():
    trimmed = np.stack([np_magnitude(D[t], DENS[t]) / DENS[t] for t in range(3)])
    close(M.task_arithmetic(D, W, DENS, trim="magnitude", rescale=True), np_merge(trimmed, W), 1e-5)


def _bernoulli_trimmed(key, dens, rescale):
    out = []
    for t, p in enumerate(dens):
        m = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, t), p, D.shape[1:]))
        out.append(np.where(m, D[t] / (p if rescale else 1.0), 0.0))
    return np.stack(out)


def test_dare_linear_and_dare_ties():
    key = jax.random.PRNGKey(5)
    trimmed = _bernoulli_trimmed(key, DENS, True)
    close(M.dare_linear(D, W, DENS, key=key), np_merge(trimmed, W), 1e-5)
    close(M.dare_ties(D, W, DENS, key=key), np_merge(trimmed, W, "sum", False), 1e-5)
    close(M.dare_ties(D, W, DENS, key=key, normalize=True), np_merge(trimmed, W, "sum", True), 1e-5)
    close(M.dare_linear(D, W, DENS, key=key, rescale=False), np_merge(_bernoulli_trimmed(key, DENS, False), W), 1e-5)


def _magprune_trimmed(key, dens, eps):
    out = []
    for t, p0 in enumerate(dens):
        rows = np.abs(D[t].astype(np.float64))
        ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable")
        p = (p0 - eps) + 2 * eps * ranks / (rows.shape[1] - 1)
        u = np.asarray(jax.random.uniform(jax.random.fold_in(key, t), rows.shape, jnp.float32))
        out.append(np.where(u < p, D[t] / p, 0.0))
    return np.stack(out)


def test_della_and_della_linear():
    key = jax.random.PRNGKey(9)
    dens = [0.3, 0.5, 0.6]
    trimmed = _magprune_trimmed(key, dens, 0.15)
    close(M.della(D, W, dens, key=key), np_merge(trimmed, W, "sum", True), 1e-5)
    close(M.della_linear(D, W, dens, key=key), np_merge(trimmed, W), 1e-5)
    trimmed = _magprune_trimmed(key, dens, 0.25)
    close(M.della(D, W, dens, key=key, epsilon=0.25), np_merge(trimmed, W, "sum", True), 1e-5)


def _breadcrumbs_trimmed(dens, gamma):
    out = []
    for t, p in enumerate(dens):
        flat = np.abs(D[t]).reshape(-1)
        n = flat.size
        k = int(round(p * n))
        top = min(int(round(gamma * n)), n - k)
        keep = np.zeros(n, bool)
        keep[np.argsort(-flat, kind="stable")[top : top + k]] = True
        out.append(np.where(keep.reshape(D[t].shape), D[t], 0.0))
    return np.stack(out)


def test_breadcrumbs_and_breadcrumbs_ties():
    trimmed = _breadcrumbs_trimmed(DENS, 0.05)
    close(M.breadcrumbs(D, W, DENS, gamma=0.05), np_merge(trimmed, W))
    close(M.breadcrumbs_ties(D, W, DENS, gamma=0.05), np_merge(trimmed, W, "sum", False))
    close(M.breadcrumbs(D, W, DENS), np_merge(_breadcrumbs_trimmed(DENS, 0.01), W))  # default gamma


def test_regmean_reference_and_optimality():
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((12, 40)) * rng.uniform(0.5, 2, (12, 1)) for _ in range(3)]
    grams = np.stack([2 * x @ x.T / 40 for x in xs]).astype(np.float32)
    g = grams.astype(np.float64)
    for alpha in (1.0, 0.5):
        gt = alpha * g + (1 - alpha) * np.stack([np.diag(np.diag(gi)) for gi in g])
        wts = np.asarray([1.0, 2.0, 0.5])
        numer = sum(wts[t] * D[t].astype(np.float64) @ gt[t] for t in range(3))
        denom = sum(wts[t] * gt[t] for t in range(3))
        expected = numer @ np.linalg.inv(denom)
        close(M.regmean(D, wts, grams=grams, alpha=alpha), expected, 2e-4)
    # alpha = 1: stationary point of sum_t ||(W - W_t) X_t||^2
    merged = np.asarray(M.regmean(D, grams=grams, alpha=1.0), np.float64)
    grad = sum((merged - D[t]) @ g[t] for t in range(3))
    assert np.abs(grad).max() < 1e-3 * np.abs(D).max() * np.abs(g).max()


def test_regmean_shared_gram_is_mean_and_dead_inputs():
    g = np.eye(12, dtype=np.float32) * 2
    close(M.regmean(D, [1, 1, 2], grams=g), np_merge(D, [1, 1, 2], None, True), 1e-5)
    grams = np.stack([np.diag(np.r_[np.ones(11), 0.0])] * 3).astype(np.float32) * np.array([1, 2, 3])[:, None, None]
    out = np.asarray(M.regmean(D, grams=grams, alpha=1.0))
    assert np.isfinite(out).all()
    close(out[:, -1], D[:, :, -1].astype(np.float64).mean(0), 1e-5)  # dead input: plain mean
    close(M.regmean(D[:, 0], [1, 3, 1]), np_merge(D[:, 0], [1, 3, 1], None, True), 1e-5)  # 1-D: mean


def test_regmean_no_gram_sum_is_the_weighted_sum_where_no_gram_applies():
    w = [1.0, 3.0, 0.5]
    d64 = D.astype(np.float64)
    exp = np.einsum("t,t...->...", np.asarray(w), d64[:, 0])  # 1-D: task arithmetic
    close(M.regmean(D[:, 0], w, no_gram="sum"), exp, 1e-5)
    close(M.regmean(D, w, no_gram="sum"), np.einsum("t,t...->...", np.asarray(w), d64), 1e-5)  # no grams
    g = np.stack([np.eye(12) * (t + 1) for t in range(3)]).astype(np.float32)
    np.testing.assert_array_equal(  # a tensor with Grams: the fit, whatever no_gram says
        np.asarray(M.regmean(D, w, grams=g, no_gram="sum")), np.asarray(M.regmean(D, w, grams=g))
    )
    with pytest.raises(ValueError, match="unknown no_gram"):
        M.regmean(D, w, no_gram="max")


# ----------------------------------------------------------------- hand-worked cases


def test_ties_conflicting_signs_by_hand():
    tv = jnp.array([[1.0, -2.0, 3.0, 0.0], [-3.0, 1.0, 1.0, 0.0], [1.0, 0.5, -5.0, 0.0]])
    # sums: [-1, -0.5, -1, 0] -> elected [-, -, -, +]; only agreeing entries are averaged
    out = M.ties(tv, [1, 1, 1])
    np.testing.assert_array_equal(np.asarray(out), [-3.0, -2.0, -5.0, 0.0])
    # count election: [+1 -1 +1] -> +, [-1 +1 +1] -> +, [+1 +1 -1] -> +
    out = M.ties(tv, [1, 1, 1], consensus="count")
    np.testing.assert_allclose(np.asarray(out), [1.0, 0.75, 2.0, 0.0])


def test_ties_sign_tie_elects_plus():
    tv = jnp.array([[2.0], [-2.0]])
    np.testing.assert_array_equal(np.asarray(M.ties(tv, [1, 1])), [2.0])


def test_ties_magnitude_ties_in_trim():
    tv = jnp.array([[1.0, -1.0, 1.0, -1.0]])
    np.testing.assert_array_equal(np.asarray(M.ties(tv, [1.0], 0.5)), [1.0, -1.0, 0.0, 0.0])


def test_zero_task_vectors():
    z = jnp.zeros((3, 4, 5))
    for name in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della"):
        kw = {"key": jax.random.PRNGKey(0)} if name in ("dare_ties", "della") else {}
        dens = 0.5 if name != "task_arithmetic" else 1.0
        out = M.get_method(name)(z, [1, 1, 1], dens, **kw)
        np.testing.assert_array_equal(np.asarray(out), 0.0)
    np.testing.assert_array_equal(np.asarray(M.regmean(z, grams=jnp.eye(5))), 0.0)


def test_negative_weights_by_hand():
    a, b = jnp.array([2.0, 1.0]), jnp.array([1.0, 3.0])
    np.testing.assert_allclose(np.asarray(M.task_arithmetic(jnp.stack([a, b]), [1, -1])), [1.0, -2.0])
    # TIES: weighted [2, 1], [-1, -3]; sums [1, -2] -> elected [+, -];
    # entry 0 keeps task 0: 2/1; entry 1 keeps task 1: (-1 * 3) / -1 = 3
    np.testing.assert_allclose(np.asarray(M.ties(jnp.stack([a, b]), [1, -1])), [2.0, 3.0])


# ----------------------------------------------------------------- invariants


def test_dare_mean_over_seeds_is_unbiased():
    tau = jnp.asarray(rng_stack(4, (1, 6, 6)))
    n = 400
    total = sum(M.dare_linear(tau, [1.0], 0.3, key=jax.random.PRNGKey(s)) for s in range(n))
    mean = np.asarray(total) / n
    sigma = np.abs(np.asarray(tau[0])) * np.sqrt(0.7 / 0.3) / np.sqrt(n)
    assert np.all(np.abs(mean - np.asarray(tau[0])) <= 5 * sigma + 1e-6)
    # and the trim alone over many more keys, tightly
    keys = jax.random.split(jax.random.PRNGKey(1), 20000)
    drops = jax.vmap(lambda k: trim.random(tau[0], 0.3, k, rescale=True))(keys)
    err = np.abs(np.asarray(drops.mean(0)) - np.asarray(tau[0]))
    assert np.all(err <= 5 * np.abs(np.asarray(tau[0])) * np.sqrt(0.7 / 0.3 / 20000) + 1e-6)


def test_same_key_bit_identical():
    key = jax.random.PRNGKey(42)
    for name in ("dare_linear", "dare_ties", "della", "della_linear"):
        f = M.get_method(name)
        a, b = f(D, W, 0.5, key=key), f(D, W, 0.5, key=key)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        c = f(D, W, 0.5, key=jax.random.PRNGKey(43))
        assert not np.array_equal(np.asarray(a), np.asarray(c))


# ----------------------------------------------------------------- errors


def test_method_argument_errors():
    with pytest.raises(ValueError, match="weights has 2 entries but there are 3 task vectors"):
        M.ties(D, [1, 1], 0.5)
    with pytest.raises(ValueError, match="densities has 2 entries but there are 3"):
        M.ties(D, W, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"densities\[0\] must be in \[0, 1\], got -0.1"):
        M.ties(D, W, [-0.1, 0.5, 0.5])
    with pytest.raises(ValueError, match="does not trim; pass trim="):
        M.task_arithmetic(D, W, 0.5)
    with pytest.raises(ValueError, match="unknown consensus"):
        M.ties(D, W, consensus="majority")
    with pytest.raises(ValueError, match="PRNG key"):
        M.dare_ties(D, W, 0.5)
    with pytest.raises(ValueError, match="sparsegpt.*needs calibration statistics"):
        M.ties(D, W, 0.5, trim="sparsegpt")
    with pytest.raises(ValueError, match="wanda.*needs calibration statistics"):
        M.dare_ties(D, W, 0.5, trim="wanda")
    with pytest.raises(ValueError, match="regmean alpha"):
        M.regmean(D, grams=np.eye(12), alpha=1.5)


def test_nan_inf_task_vector_error_names_model_and_tensor():
    bad = D.copy()
    bad[1, 0, 0] = np.nan
    bad[2, 1, 1] = np.inf
    with pytest.raises(
        ValueError, match=r"NaN or Inf in task vector\(s\) for tensor 'w': model 1 \(1 entries\), model 2"
    ):
        M.ties(bad, W, 0.5, name="w")


def test_unknown_method_lists_known():
    with pytest.raises(
        ValueError,
        match="unknown merge method 'slurp'; known methods: linear, task_arithmetic, ties, dare_linear, dare_ties, della, della_linear, breadcrumbs, breadcrumbs_ties, regmean, slerp, nuslerp, multislerp, karcher, model_stock, sce, nearswap, arcee_fusion, passthrough",
    ):
        M.get_method("slurp")
