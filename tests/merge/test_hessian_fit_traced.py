"""The Hessian fits with traced weights and densities: merge_grid and jit equal the eager calls.

The eager calls themselves are checked against float64 NumPy in tests/merge/test_hessian_fit.py;
here the compiled programs (vmap over densities and weights, jit) must reproduce them,
and bad traced values must become checkify errors and NaN, never a silent merge.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from sgtv_jax.merge import hessian_fit as hf
from sgtv_jax.merge.batch import merge_grid
from sgtv_jax.merge.trim import Calibration

T, OUT, IN, N = 3, 8, 6, 40
FITS = {"lstsq": hf.lstsq, "regmean_trim": hf.regmean_trim, "regmean_sparse": hf.regmean_sparse}

_rng = np.random.default_rng(0)
D = _rng.standard_normal((T, OUT, IN)).astype(np.float32)
_X = np.einsum("ij,tjn->tin", _rng.standard_normal((IN, IN)), _rng.standard_normal((T, IN, N)))
H_TASKS = (np.einsum("tin,tjn->tij", _X, _X) / N).astype(np.float32)  # [T, in, in]
H_SHARED = H_TASKS.mean(0)  # [in, in]
HESSIANS = {"per_task": H_TASKS, "shared": H_SHARED}

# [D=2, T] densities (per task, so regmean_sparse's mean density is not one of them), [W=2, T], [L=2]
DENS = np.array([[0.3, 0.5, 0.4], [0.6, 0.6, 0.6]], np.float32)
WEIGHTS = np.array([[1.0, 1.0, 1.0], [0.5, 1.0, 2.0]], np.float32)
LAMS = [1.0, 0.6]


def close(out, ref):
    """Same support, float32 agreement (the programs differ from eager only in op order)."""
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(ref)) and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out == 0, ref == 0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("hessian", sorted(HESSIANS))
@pytest.mark.parametrize("trim", ["magnitude", "sparsegpt"])
@pytest.mark.parametrize("method", sorted(FITS))
def test_merge_grid_equals_the_eager_calls(method, trim, hessian):
    calib = Calibration(hessian=jnp.asarray(HESSIANS[hessian]))
    grid = merge_grid(method, D, WEIGHTS, DENS, LAMS, calib=calib, trim=trim)
    assert grid.shape == (2, 2, 2, OUT, IN)
    for i in range(2):
        for j in range(2):
            eager = FITS[method](D, list(map(float, WEIGHTS[j])), list(map(float, DENS[i])), trim=trim, calib=calib)
            for k, lam in enumerate(LAMS):
                close(grid[i, j, k], eager * np.float32(lam))


def test_merge_grid_traces_gamma_for_the_merged_trim():
    """regmean_sparse trims at the mean gamma: traced in the grid, a Python float eagerly."""
    calib = Calibration(hessian=jnp.asarray(H_TASKS))
    kw = dict(calib=calib, trim="breadcrumbs")
    grid = merge_grid("regmean_sparse", D, WEIGHTS, DENS, gamma=0.05, **kw)
    for i in range(2):
        for j in range(2):
            eager = hf.regmean_sparse(D, list(map(float, WEIGHTS[j])), list(map(float, DENS[i])), gamma=0.05, **kw)
            close(grid[i, j, 0], eager)


def test_merge_grid_mean_density_of_shared_densities_is_exact():
    """d = float32(12.5 / 48): eager keeps round(d * 48) = 12 entries of the merged 8 x 6 vector;
    a float32 mean of [d, d, d] is one ulp above d and would keep 13."""
    d = float(np.float32(12.5 / (OUT * IN)))
    calib = Calibration(hessian=jnp.asarray(H_TASKS))
    grid = merge_grid("regmean_sparse", D, WEIGHTS, [d, 0.5], calib=calib, trim="magnitude")
    for j in range(2):
        eager = hf.regmean_sparse(D, list(map(float, WEIGHTS[j])), d, calib=calib, trim="magnitude")
        assert int(np.sum(np.asarray(eager) != 0)) == round(d * OUT * IN) == 12
        close(grid[0, j, 0], eager)


@pytest.mark.parametrize("method", sorted(FITS))
def test_jit_with_traced_weights_and_densities_equals_eager(method):
    calib = Calibration(hessian=jnp.asarray(H_TASKS))
    fn = FITS[method]
    traced = jax.jit(lambda w, d: fn(D, w, d, trim="sparsegpt", calib=calib))
    w, d = WEIGHTS[1], DENS[0]
    close(
        traced(jnp.asarray(w), jnp.asarray(d)),
        fn(D, list(map(float, w)), list(map(float, d)), trim="sparsegpt", calib=calib),
    )


def _fallback(w, d):
    """lstsq without Grams: the weighted mean of the trimmed task vectors."""
    return hf.lstsq(D, w, d, trim="magnitude")


CHECKED = checkify.checkify(jax.jit(_fallback), errors=checkify.user_checks)


def test_traced_bad_values_are_checkify_errors_and_nan():
    good = dict(w=jnp.asarray([1.0, 0.5, 2.0]), d=jnp.asarray(0.4))
    err, out = CHECKED(**good)
    assert err.get() is None
    close(out, _fallback([1.0, 0.5, 2.0], 0.4))
    cases = [
        (dict(w=jnp.asarray([1.0, -1.0, 0.0])), "the weighted mean needs weights that do not sum to 0"),
        (dict(w=jnp.asarray([1.0, jnp.nan, 1.0])), "weights must be finite"),
        (dict(d=jnp.asarray(1.5)), "densities must be in [0, 1]"),
    ]
    for bad, message in cases:
        err, out = CHECKED(**{**good, **bad})
        assert err.get() is not None and message in err.get(), (bad, err.get())
        assert bool(jnp.all(jnp.isnan(out))), bad
    # without checkify the program runs and a zero weight sum gives NaN, not a silent merge
    assert bool(jnp.all(jnp.isnan(jax.jit(_fallback)(jnp.asarray([1.0, -1.0, 0.0]), 0.4))))
    # the eager call keeps its message, with the weights
    with pytest.raises(ValueError, match=r"do not sum to 0, got \[1.0, -1.0, 0.0\]"):
        _fallback([1.0, -1.0, 0.0], 0.4)


def test_traced_densities_below_one_without_a_trim_are_nan():
    f = jax.jit(lambda d: hf.lstsq(D, [1.0, 1.0, 1.0], d, trim=None, calib=Calibration(hessian=jnp.asarray(H_TASKS))))
    assert bool(jnp.all(jnp.isfinite(f(jnp.asarray(1.0)))))
    assert bool(jnp.all(jnp.isnan(f(jnp.asarray(0.5)))))
    with pytest.raises(ValueError, match="need a trim"):
        hf.lstsq(D, [1.0, 1.0, 1.0], 0.5, trim=None)


@pytest.mark.parametrize("method", sorted(FITS))
def test_merge_grid_traces_proxy_gram(method):
    """`proxy_gram` is a traced grid parameter (one program for every beta): equal to the eager calls."""
    calib = Calibration(hessian=jnp.asarray(H_TASKS))
    kw = dict(calib=calib, trim="magnitude", gram_norm="trace")
    for beta in (0.0, 0.5):
        grid = merge_grid(method, D, WEIGHTS, DENS, proxy_gram=beta, **kw)
        for i in range(2):
            for j in range(2):
                w, d = list(map(float, WEIGHTS[j])), list(map(float, DENS[i]))
                close(grid[i, j, 0], FITS[method](D, w, d, proxy_gram=beta, **kw))
