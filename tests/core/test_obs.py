"""The OBS core against the float64 NumPy oracle, its invariants and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgtv_jax import block_prune_counts, inverse_factor, obs_prune, obs_prune_from_inverse
from tests.helpers import oracle


def problem(rows, cols, seed=0, tokens=None, ill=False):
    rng = np.random.default_rng(seed)
    x = oracle.correlated_inputs(rng, tokens or 2 * cols, cols)
    if ill:  # condition number ~1e8: features on wildly different scales
        x = x * np.logspace(-4, 0, cols)
    h = 2 * x.T @ x / 4
    d = rng.standard_normal((rows, cols))
    return d, h


def rel(a, b):
    return np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300)


CASES = [
    # rows, cols, density, blocksize
    (24, 64, 0.05, 16),
    (24, 64, 0.5, 32),
    (17, 100, 0.3, 32),  # cols not a multiple of blocksize
    (40, 300, 0.95, 128),  # panels inside full blocks + a partial block
    (33, 160, 0.7, 128),
]


@pytest.mark.parametrize("rows,cols,density,blocksize", CASES)
@pytest.mark.parametrize("ill", [False, True])
def test_matches_oracle_x64(rows, cols, density, blocksize, ill):
    d, h = problem(rows, cols, seed=rows + cols, ill=ill)
    q, mask, loss = oracle.obs_prune(d, h, density=density, blocksize=blocksize)
    with jax.enable_x64(True):
        p, got_loss = obs_prune(jnp.asarray(d), jnp.asarray(h), density=density, blocksize=blocksize)
        assert p.dtype == jnp.float64
        p = np.asarray(p)
    np.testing.assert_array_equal(p == 0, mask)
    assert rel(p, q) < 1e-6
    assert abs(float(got_loss) - loss) <= 1e-6 * abs(loss)


@pytest.mark.parametrize("rows,cols,density,blocksize", CASES[:3])
def test_matches_oracle_float32(rows, cols, density, blocksize):
    d, h = problem(rows, cols, seed=7)
    q, mask, _ = oracle.obs_prune(d, h, density=density, blocksize=blocksize)
    p, _ = obs_prune(d.astype(np.float32), h.astype(np.float32), density=density, blocksize=blocksize)
    assert p.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p) == 0, mask)
    assert rel(p, q) < 1e-4


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 32), (4, 8, 128), (2, 4, 128)])
def test_nm_matches_oracle(n, m, blocksize):
    d, h = problem(20, 256, seed=n * m)
    q, mask, _ = oracle.obs_prune(d, h, prunen=n, prunem=m, blocksize=blocksize)
    with jax.enable_x64(True):
        p = np.asarray(obs_prune(d, h, prunen=n, prunem=m, blocksize=blocksize)[0])
    np.testing.assert_array_equal(p == 0, mask)
    assert rel(p, q) < 1e-6
    # every group of m consecutive columns keeps exactly m - n per row
    assert np.all((p != 0).reshape(20, -1, m).sum(-1) == m - n)


def test_dead_columns_are_zeroed_and_match_oracle():
    d, h = problem(16, 64, seed=3)
    dead = [0, 5, 63]
    h[dead, :] = 0
    h[:, dead] = 0
    q, mask, _ = oracle.obs_prune(d, h, density=0.4, blocksize=32)
    with jax.enable_x64(True):
        p = np.asarray(obs_prune(d, h, density=0.4, blocksize=32)[0])
    assert np.all(p[:, dead] == 0)
    np.testing.assert_array_equal(p == 0, mask)
    assert rel(p, q) < 1e-6


@pytest.mark.parametrize("density", [0.1, 0.37, 0.8])
def test_exact_prune_count_per_block(density):
    rows, cols, bs = 19, 150, 32
    d, h = problem(rows, cols, seed=11)
    p = np.asarray(obs_prune(d.astype(np.float32), h.astype(np.float32), density=density, blocksize=bs)[0])
    counts = block_prune_counts([density], rows, cols, bs)[0]
    for b, i1 in enumerate(range(0, cols, bs)):
        assert np.sum(p[:, i1 : i1 + bs] == 0) == counts[b]


def test_ties_broken_in_row_major_order():
    # Identical scores everywhere (H = I, |d| constant): the first k entries in
    # row-major order of each block are the pruned ones.
    rows, cols = 4, 8
    d = np.ones((rows, cols))
    p = np.asarray(obs_prune(d, np.eye(cols), density=0.5, blocksize=8)[0])
    assert np.all(p.ravel()[:16] == 0) and np.all(p.ravel()[16:] != 0)


def test_density_edge_cases():
    d, h = problem(8, 40, seed=2)
    d32 = d.astype(np.float32)
    same, loss = obs_prune(d32, h, density=1.0)
    np.testing.assert_array_equal(np.asarray(same), d32)
    assert float(loss) == 0
    zero, _ = obs_prune(d32, h, density=0.0)
    assert np.all(np.asarray(zero) == 0)


def test_obs_beats_magnitude_on_correlated_inputs():
    rng = np.random.default_rng(5)
    cols = 128
    x = oracle.correlated_inputs(rng, 1024, cols).T  # [cols, tokens]
    h = 2 * x @ x.T / 8
    d = rng.standard_normal((64, cols))
    for density in (0.1, 0.3, 0.5):
        p = np.asarray(obs_prune(d.astype(np.float32), h.astype(np.float32), density=density)[0], np.float64)
        thresh = np.sort(np.abs(d).ravel())[round((1 - density) * d.size)]
        mag = np.where(np.abs(d) >= thresh, d, 0)
        e_obs, e_mag = (np.linalg.norm((d - dp) @ x) / np.linalg.norm(d @ x) for dp in (p, mag))
        assert e_obs < e_mag, (density, e_obs, e_mag)


def test_stack_shared_hessian_equals_loop():
    d, h = problem(12, 96, seed=4)
    rng = np.random.default_rng(4)
    stack = np.stack([d, rng.standard_normal(d.shape), 0.1 * d]).astype(np.float32)
    densities = [0.2, 0.5, 0.9]
    p, loss = obs_prune(stack, h.astype(np.float32), density=densities, blocksize=32)
    for t in range(3):
        pt, lt = obs_prune(stack[t], h.astype(np.float32), density=densities[t], blocksize=32)
        np.testing.assert_allclose(np.asarray(p[t]), np.asarray(pt), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(loss[t]), float(lt), rtol=1e-5)


def test_stack_per_task_hessians_equals_loop():
    rows, cols = 10, 64
    ds, hs = zip(*(problem(rows, cols, seed=s) for s in range(3)))
    stack, hstack = np.stack(ds).astype(np.float32), np.stack(hs).astype(np.float32)
    p, _ = obs_prune(stack, hstack, density=0.3, blocksize=32)
    for t in range(3):
        pt, _ = obs_prune(stack[t], hstack[t], density=0.3, blocksize=32)
        np.testing.assert_allclose(np.asarray(p[t]), np.asarray(pt), rtol=1e-5, atol=1e-6)


def test_from_inverse_matches_oracle():
    d, h = problem(14, 70, seed=9)
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(70)
    u = np.linalg.cholesky(np.linalg.inv(hd)).T
    q, mask, _ = oracle.obs_prune(d, None, density=0.4, blocksize=32, u=u)
    with jax.enable_x64(True):
        p = np.asarray(obs_prune_from_inverse(d, np.linalg.inv(hd), density=0.4, blocksize=32)[0])
    np.testing.assert_array_equal(p == 0, mask)
    assert rel(p, q) < 1e-6


def test_damping_escalates_and_is_reported():
    # Slightly indefinite: the smallest eigenvalue is -0.5% of the mean diagonal,
    # so percdamp=0.001 fails and the first escalation (0.01) succeeds.
    rng = np.random.default_rng(0)
    qmat, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    eig = np.linspace(1, 2, 32)
    eig[0] = -0.005 * eig.mean()
    h = (qmat * eig) @ qmat.T
    f = inverse_factor(jnp.asarray(h, jnp.float32), 0.001)
    assert bool(f.ok)
    assert float(f.percdamp) == pytest.approx(0.01, rel=1e-5)
    d = rng.standard_normal((4, 32))
    p, _ = obs_prune(d, h, density=0.5, percdamp=0.001)
    assert np.all(np.isfinite(np.asarray(p)))


def test_indefinite_hessian_raises_after_escalation():
    h = -np.eye(16)
    with pytest.raises(ValueError, match="layers.0.q_proj is not positive definite"):
        obs_prune(np.ones((4, 16)), h, density=0.5, name="layers.0.q_proj")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(delta=np.ones(5)), "delta must be"),
        (dict(hessian=np.eye(7)), "hessian must have shape"),
        (dict(density=1.5), "density must be in"),
        (dict(density=-0.1), "density must be in"),
        (dict(density=[0.5, 0.5]), "2 entries but there are 1"),
        (dict(density=None, prunen=2, prunem=4, blocksize=30), "multiple of prunem"),
        (dict(density=None, prunen=4, prunem=4), "0 < prunen < prunem"),
        (dict(density=None), "density is required"),
        (dict(blocksize=0), "blocksize must be a positive integer"),
        (dict(delta=np.full((4, 16), np.nan)), "delta .* NaN or Inf"),
        (dict(hessian=np.full((16, 16), np.inf)), "hessian contains .* NaN or Inf"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(delta=np.ones((4, 16)), hessian=np.eye(16), density=0.5)
    args.update(kwargs)
    delta, hessian = args.pop("delta"), args.pop("hessian")
    with pytest.raises(ValueError, match=match):
        obs_prune(delta, hessian, **args)
