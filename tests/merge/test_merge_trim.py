"""Trims against plain float64 NumPy references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgtv_jax.merge import trim
from sgtv_jax.merge.keys import name_hash, task_keys, tensor_key


def rng_tensor(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ref_magnitude(d, density):
    d = np.asarray(d, np.float64)
    flat = np.abs(d).reshape(-1)
    k = int(round(density * flat.size))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return np.where(keep.reshape(d.shape), d, 0.0)


def ref_breadcrumbs(d, density, gamma):
    d = np.asarray(d, np.float64)
    flat = np.abs(d).reshape(-1)
    n = flat.size
    k = int(round(density * n))
    n_top = min(int(round(gamma * n)), n - k)
    order = np.argsort(-flat, kind="stable")
    keep = np.zeros(n, bool)
    keep[order[n_top : n_top + k]] = True
    return np.where(keep.reshape(d.shape), d, 0.0)


def ref_wanda(d, density, norms):
    d = np.asarray(d, np.float64)
    scores = np.abs(d) * np.asarray(norms, np.float64)[None]
    k = int(round(density * d.shape[1]))
    out = np.zeros_like(d)
    for r in range(d.shape[0]):
        idx = np.argsort(-scores[r], kind="stable")[:k]
        out[r, idx] = d[r, idx]
    return out


@pytest.mark.parametrize("density", [0.0, 0.1, 0.29, 0.5, 0.9, 1.0])
def test_magnitude_matches_reference(density):
    d = rng_tensor(0, (10, 10))
    out = trim.magnitude(jnp.asarray(d), density)
    np.testing.assert_array_equal(np.asarray(out, np.float64), ref_magnitude(d, density))
    assert int(np.count_nonzero(out)) == int(round(density * 100))  # 0.29 -> 29, not int() -> 28


def test_magnitude_rescale_and_nd():
    d = rng_tensor(1, (3, 4, 5))
    out = trim.magnitude(jnp.asarray(d), 0.25, rescale=True)
    np.testing.assert_allclose(np.asarray(out), ref_magnitude(d, 0.25) / 0.25, rtol=1e-6)


def test_magnitude_ties_keep_earlier_entries():
    d = jnp.array([[1.0, -1.0, 1.0, -1.0], [0.5, 1.0, -1.0, 0.25]])
    out = trim.magnitude(d, 0.5)  # k = 4 of 8; five entries tie at |1|
    expected = np.array([[1.0, -1.0, 1.0, -1.0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("density,gamma", [(0.3, 0.01), (0.3, 0.1), (0.9, 0.2), (0.5, 0.0)])
def test_breadcrumbs_matches_reference(density, gamma):
    d = rng_tensor(2, (20, 10))
    out = trim.breadcrumbs(jnp.asarray(d), density, gamma=gamma)
    np.testing.assert_array_equal(np.asarray(out, np.float64), ref_breadcrumbs(d, density, gamma))


def test_breadcrumbs_drops_outliers():
    d = jnp.arange(1.0, 11.0)  # |d| = 1..10
    out = trim.breadcrumbs(d, 0.3, gamma=0.2)  # drop 10, 9; keep 8, 7, 6
    np.testing.assert_array_equal(np.asarray(out), [0, 0, 0, 0, 0, 6, 7, 8, 0, 0])


@pytest.mark.parametrize("density", [0.0, 0.25, 0.5, 1.0])
def test_wanda_matches_reference(density):
    d = rng_tensor(3, (6, 8))
    norms = np.abs(rng_tensor(4, (8,))) + 0.1
    out = trim.wanda(jnp.asarray(d), density, jnp.asarray(norms))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_wanda(d, density, norms), rtol=0, atol=0)


def test_wanda_norms_from_hessian():
    d = rng_tensor(5, (2, 4, 8))
    x = rng_tensor(6, (64, 8)) * np.arange(1, 9, dtype=np.float32)
    h = 2.0 * x.T @ x
    norms = np.sqrt(np.diag(h.astype(np.float64)) / 2)
    out = trim.trim("wanda", jnp.asarray(d), [0.5, 0.25], calib=trim.Calibration(hessian=jnp.asarray(h)))
    np.testing.assert_array_equal(np.asarray(out[0], np.float64), ref_wanda(d[0], 0.5, norms))
    np.testing.assert_array_equal(np.asarray(out[1], np.float64), ref_wanda(d[1], 0.25, norms))


def test_random_uses_per_task_keys_and_rescales():
    d = rng_tensor(7, (2, 16, 16))
    key = jax.random.PRNGKey(3)
    out = trim.trim("random", jnp.asarray(d), [0.3, 0.6], key=key, rescale=True)
    for t, p in enumerate([0.3, 0.6]):
        mask = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, t), p, d.shape[1:]))
        np.testing.assert_allclose(np.asarray(out[t]), np.where(mask, d[t] / p, 0.0), rtol=1e-6)
    assert not np.array_equal(np.asarray(out[0]) != 0, np.asarray(out[1]) != 0)


def test_random_keep_fraction():
    d = jnp.ones((200, 200))
    out = trim.random(d, 0.2, jax.random.PRNGKey(0), rescale=False)
    frac = float(jnp.mean(out != 0))
    assert abs(frac - 0.2) < 5 * np.sqrt(0.2 * 0.8 / 40000)


def ref_magprune_probs(d, density, epsilon):
    rows = np.abs(np.asarray(d, np.float64)).reshape(d.shape[0], -1)
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable")
    return (density - epsilon) + 2 * epsilon * ranks / (n - 1)


def test_magprune_matches_reference():
    d = rng_tensor(8, (2, 5, 12))
    key = jax.random.PRNGKey(11)
    out = trim.trim("magprune", jnp.asarray(d), 0.4, key=key, epsilon=0.1, rescale=True)
    for t in range(2):
        p = ref_magprune_probs(d[t], 0.4, 0.1)
        u = np.asarray(jax.random.uniform(jax.random.fold_in(key, t), (5, 12), jnp.float32))
        expected = np.where(u < p, d[t] / p, 0.0)
        np.testing.assert_allclose(np.asarray(out[t]), expected, rtol=1e-6)


def test_magprune_prefers_large_entries():
    d = jnp.tile(jnp.arange(1.0, 101.0), (400, 1))
    out = trim.magprune(d, 0.5, jax.random.PRNGKey(0), epsilon=0.4, rescale=False)
    kept = np.asarray(out != 0).mean(axis=0)
    assert kept[:10].mean() < 0.2 and kept[-10:].mean() > 0.8


def test_magprune_epsilon_range_error():
    with pytest.raises(ValueError, match="density - epsilon"):
        trim.magprune(jnp.ones((2, 3)), 0.1, jax.random.PRNGKey(0), epsilon=0.15)


def test_edges_density_one_and_zero():
    d = jnp.asarray(rng_tensor(9, (4, 4)))
    key = jax.random.PRNGKey(0)
    for kind in ("magnitude", "random", "magprune", "breadcrumbs"):
        one = trim.trim(kind, d[None], 1.0, key=key, rescale=True)
        zero = trim.trim(kind, d[None], 0.0, key=key, rescale=True)
        np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(d))
        np.testing.assert_array_equal(np.asarray(zero[0]), 0.0)


def test_calibration_trims_need_statistics():
    d = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="sparsegpt.*needs calibration statistics.*'layer'"):
        trim.trim("sparsegpt", d, 0.5, name="layer")
    with pytest.raises(ValueError, match="wanda.*needs calibration statistics"):
        trim.trim("wanda", d, 0.5)
    with pytest.raises(ValueError, match="random.*PRNG key"):
        trim.trim("random", d, 0.5)
    with pytest.raises(ValueError, match="unknown trim 'topk'; known trims: magnitude, random"):
        trim.trim("topk", d, 0.5)


def test_density_and_length_errors():
    d = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"densities\[1\] must be in \[0, 1\], got 1.5"):
        trim.trim("magnitude", d, [0.5, 1.5])
    with pytest.raises(ValueError, match="densities has 3 entries but there are 2 task vectors"):
        trim.trim("magnitude", d, [0.5, 0.5, 0.5])


def test_keys_stable_and_order_free():
    k1 = tensor_key(0, "a.weight")
    k2 = tensor_key(0, "a.weight")
    k3 = tensor_key(0, "b.weight")
    np.testing.assert_array_equal(np.asarray(k1), np.asarray(k2))
    assert not np.array_equal(np.asarray(k1), np.asarray(k3))
    ks = task_keys(k1, 3)
    assert len({tuple(np.asarray(k).tolist()) for k in ks}) == 3
    # crc32-based: fixed across processes (Python's hash() is salted)
    import zlib

    assert name_hash("a.weight") == zlib.crc32(b"a.weight") & 0x7FFFFFFF
