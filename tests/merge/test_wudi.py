"""WUDI merging against a float64 NumPy Adam on the paper's loss, its closed form, and through `merge_planned`."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgtv_jax.merge import get_method, regmean, wudi
from sgtv_jax.merge.plan import TensorPlan, merge_planned


def np_wudi(deltas: np.ndarray, steps: int, lr: float) -> np.ndarray:
    """Adam (PyTorch / optax defaults) on sum_t ||(M - tau_t) tau_t^T||^2 / ||tau_t||^2 from sum_t tau_t.

    The gradient is formed the loss's own way, `(M - tau_t) tau_t^T` then times `tau_t`, not from Grams.
    """
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = deltas.sum(0)
    mu = np.zeros_like(m)
    nu = np.zeros_like(m)
    for k in range(1, steps + 1):
        g = np.zeros_like(m)
        for tau in deltas:
            sq = np.sum(tau * tau)
            if sq > 0:
                g += 2.0 * ((m - tau) @ tau.T) @ tau / sq
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        m = m - lr * (mu / (1 - b1**k)) / (np.sqrt(nu / (1 - b2**k)) + eps)
    return m


def loss(m: np.ndarray, deltas: np.ndarray) -> float:
    return float(sum(np.sum(((m - t) @ t.T) ** 2) / np.sum(t * t) for t in deltas if np.any(t)))


@pytest.fixture
def deltas() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, 6, 5)) * np.array([1.0, 0.1, 3.0])[:, None, None]


def test_matches_numpy_adam_on_the_loss(deltas):
    with jax.enable_x64(True):
        got = np.asarray(wudi(deltas, steps=40, learning_rate=1e-2))
    want = np_wudi(deltas, 40, 1e-2)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert loss(got, deltas) < loss(deltas.sum(0), deltas)


def test_wide_tensors_take_the_row_side_products_and_agree():
    rng = np.random.default_rng(1)
    wide = rng.normal(size=(3, 2, 40)) * 0.1  # 2 T out < in: no [in, in] Gram is formed
    wide[2] = 0.0
    with jax.enable_x64(True):
        got = np.asarray(wudi(wide, steps=30, learning_rate=1e-2))
    np.testing.assert_allclose(got, np_wudi(wide, 30, 1e-2), rtol=1e-10, atol=1e-12)


def test_default_run_matches_numpy_and_stays_near_the_sum(deltas):
    with jax.enable_x64(True):
        got = np.asarray(wudi(deltas))
    np.testing.assert_allclose(got, np_wudi(deltas, 300, 1e-5), rtol=1e-10, atol=1e-12)
    # an Adam step moves an entry by at most lr (1 - b1) / sqrt(1 - b2): the result stays near the sum
    moved = np.max(np.abs(got - deltas.sum(0)))
    assert 0 < moved <= 300 * 1e-5 * 0.1 / np.sqrt(0.001)
    assert loss(got, deltas) < loss(deltas.sum(0), deltas)


def test_long_run_reaches_the_closed_form_regmean_with_proxy_grams(deltas):
    sq = np.sum(deltas**2, axis=(1, 2))
    grams = np.einsum("toi,toj->tij", deltas, deltas)
    closed = np.linalg.solve(
        np.sum(grams / sq[:, None, None], 0), np.einsum("toi,tij->oj", deltas, grams / sq[:, None, None]).T
    ).T
    with jax.enable_x64(True):
        via_regmean = np.asarray(regmean(deltas, 1.0 / sq, grams=grams, alpha=1.0))
        got = np.asarray(wudi(deltas, steps=20000, learning_rate=1e-2))
    np.testing.assert_allclose(via_regmean, closed, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got, closed, atol=2e-3)
    assert loss(got, deltas) <= loss(closed, deltas) + 1e-6


def test_weights_scale_the_task_vectors(deltas):
    w = np.array([0.5, 2.0, 1.0])
    with jax.enable_x64(True):
        got = np.asarray(wudi(deltas, w, steps=25, learning_rate=1e-2))
    np.testing.assert_allclose(got, np_wudi(deltas * w[:, None, None], 25, 1e-2), rtol=1e-10, atol=1e-12)


def test_zero_task_vectors_drop_out_and_an_untouched_tensor_stays_zero(deltas):
    padded = np.concatenate([deltas, np.zeros((1,) + deltas.shape[1:])])
    with jax.enable_x64(True):
        got = np.asarray(wudi(padded, steps=30, learning_rate=1e-2))
        zero = np.asarray(wudi(np.zeros((3, 4, 4)), steps=30, learning_rate=1e-2))
    np.testing.assert_allclose(got, np_wudi(deltas, 30, 1e-2), rtol=1e-10, atol=1e-12)
    assert np.all(zero == 0)


def test_tensors_that_are_not_matrices_are_summed(deltas):
    vecs = deltas[:, 0, :]
    w = np.array([1.0, -1.0, 0.5])
    with jax.enable_x64(True):
        got = np.asarray(wudi(vecs, w))
    np.testing.assert_allclose(got, np.einsum("t,ti->i", w, vecs), rtol=1e-14)


def test_jit_and_vmap_agree_with_the_eager_call(deltas):
    x = jnp.asarray(deltas, jnp.float32)
    eager = wudi(x, steps=10, learning_rate=1e-3)
    jitted = jax.jit(lambda d, lr: wudi(d, steps=10, learning_rate=lr))(x, 1e-3)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-7)
    batched = jax.vmap(lambda d: wudi(d, steps=10, learning_rate=1e-3))(jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(eager), rtol=1e-6, atol=1e-7)
    assert get_method("wudi") is wudi


def test_merge_planned_runs_it_by_name_with_the_config_parameters(deltas):
    plan = TensorPlan(
        "wudi", "layer.weight", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), params={"steps": 15, "learning_rate": 1e-2}
    )
    with jax.enable_x64(True):
        got, _, info = merge_planned(plan, jnp.asarray(deltas))
    np.testing.assert_allclose(np.asarray(got), np_wudi(deltas, 15, 1e-2), rtol=1e-9, atol=1e-12)
    assert info.trim is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"steps": -1}, "steps must be a non-negative integer"), ({"learning_rate": 0.0}, "learning_rate must be > 0")],
)
def test_bad_settings_name_the_tensor(deltas, kw, match):
    with pytest.raises(ValueError, match=f"{match}.*layers.3.q_proj"):
        wudi(deltas, name="layers.3.q_proj", **kw)


def test_nan_task_vector_is_refused_naming_the_model(deltas):
    bad = deltas.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf.*model 1"):
        wudi(bad, name="w")


def np_nearest_minimiser(deltas: np.ndarray) -> np.ndarray:
    """Gradient descent's limit from the sum, in float64 by SVD: `S + (B - S A) A^+` on the span of A."""
    live = [t / np.sqrt(np.sum(t * t)) for t in deltas if np.any(t)]
    a = sum(x.T @ x for x in live)
    b = sum(t @ (x.T @ x) for t, x in zip([t for t in deltas if np.any(t)], live))
    s = deltas.sum(0)
    u, sv, _ = np.linalg.svd(a)
    keep = sv > 1e-10 * sv[0]
    pinv = u[:, keep] @ np.diag(1 / sv[keep]) @ u[:, keep].T
    return s + (b - s @ a) @ pinv


@pytest.mark.parametrize("shape", [(3, 6, 5), (3, 2, 40), (2, 3, 7)])  # full rank, wide, rank-deficient tall
def test_exact_solver_is_the_minimiser_nearest_the_sum(shape):
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape) * np.array([1.0, 0.1, 3.0][: shape[0]])[:, None, None]
    w = [1.0, 0.5, 2.0][: shape[0]]
    xw = x * np.asarray(w)[:, None, None]
    with jax.enable_x64(True):
        got = np.asarray(wudi(x, w, solver="exact"))
    want = np_nearest_minimiser(xw)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    # a minimiser: the gradient 2 (M A - B) vanishes, and the loss is no larger than Adam's
    assert loss(got, xw) <= loss(np.asarray(wudi(x, w, steps=300, learning_rate=1e-3)), xw) + 1e-9


def test_exact_solver_on_full_rank_grams_is_the_regmean_closed_form(deltas):
    sq = np.sum(deltas**2, axis=(1, 2))
    grams = np.einsum("toi,toj->tij", deltas, deltas)
    with jax.enable_x64(True):
        got = np.asarray(wudi(deltas, solver="exact"))
        closed = np.asarray(regmean(deltas, 1.0 / sq, grams=grams, alpha=1.0))
    np.testing.assert_allclose(got, closed, rtol=1e-8, atol=1e-10)


def test_exact_solver_leaves_untouched_tensors_and_directions_alone():
    x = np.zeros((3, 4, 6))
    x[0, :, :2] = np.arange(8.0).reshape(4, 2) + 1  # only inputs 0, 1 are spanned
    with jax.enable_x64(True):
        got = np.asarray(wudi(x, solver="exact"))
        zero = np.asarray(wudi(np.zeros((3, 4, 4)), solver="exact"))
    np.testing.assert_allclose(got, x[0], atol=1e-12)  # one task: its own task vector fits exactly
    assert not zero.any()


def test_unknown_solver_is_refused_naming_the_tensor(deltas):
    with pytest.raises(ValueError, match="solver must be one of.*'newton'.*'blk'"):
        wudi(deltas, solver="newton", name="blk")


def test_one_compiled_adam_program_per_shape_across_tensors():
    wudi_module = importlib.import_module("sgtv_jax.merge.wudi")  # the package exports the function by that name
    rng = np.random.default_rng(5)
    before = wudi_module._adam_jit._cache_size()
    first = [np.asarray(wudi(rng.normal(size=(2, 9, 7)).astype(np.float32), steps=3)) for _ in range(3)]
    assert wudi_module._adam_jit._cache_size() == before + 1  # three tensors of one shape: one program
    assert all(np.isfinite(f).all() for f in first)
