"""The PyTorch original's API gives the core's results, and keeps its names and arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sgtv_jax
from sgtv_jax import (
    HessianCalculator,
    SparseGPTTaskVector,
    compute_importance_scores,
    generate_importance_mask,
    obs_prune,
    prune_task_vector_with_error_correction,
    trim_with_sparsegpt_importance,
)
from tests.helpers import oracle


@pytest.fixture
def layer():
    rng = np.random.default_rng(0)
    x = oracle.correlated_inputs(rng, 3 * 40, 48).reshape(3, 40, 48).astype(np.float32)
    d = rng.standard_normal((20, 48)).astype(np.float32)
    return x, d


def test_sparsegpt_task_vector_equals_core(layer):
    x, d = layer
    pruner = SparseGPTTaskVector((20, 48))
    for xb in x:
        pruner.add_batch(torch.from_numpy(xb[None]))  # torch tensors are accepted
    h = sgtv_jax.hessian_update(sgtv_jax.hessian_init(48), x).hessian
    np.testing.assert_allclose(np.asarray(pruner.get_hessian()), np.asarray(h), rtol=1e-5, atol=1e-6)
    assert pruner.nsamples == 3
    got = pruner.fasterprune(torch.from_numpy(d), density=0.3, blocksize=16)
    want, _ = obs_prune(d, pruner.get_hessian(), density=0.3, blocksize=16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    rescaled = pruner.fasterprune(d, 0.3, blocksize=16, rescale=True)
    np.testing.assert_allclose(np.asarray(rescaled), np.asarray(want) / 0.3, rtol=1e-6)
    nm = pruner.fasterprune(d, None, blocksize=16, prunen=2, prunem=4)
    assert np.all((np.asarray(nm) != 0).reshape(20, -1, 4).sum(-1) == 2)
    pruner.free()
    with pytest.raises(ValueError, match="freed"):
        pruner.fasterprune(d, 0.3)


def test_inverse_hessian_and_pruning_from_it(layer):
    x, d = layer
    calc = HessianCalculator((20, 48))
    calc.add_batch(x)
    h = np.asarray(calc.get_hessian(), np.float64)
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(48)
    hinv = np.asarray(calc.get_inverse_hessian())
    np.testing.assert_allclose(hinv, np.linalg.inv(hd), rtol=2e-3, atol=1e-6 * np.abs(hinv).max())
    np.testing.assert_allclose(np.asarray(calc.get_inverse_hessian_diag()), np.diag(hinv), rtol=1e-5)
    got = prune_task_vector_with_error_correction(d, hinv, 0.4, blocksize=16)
    want, _ = sgtv_jax.obs_prune_from_inverse(d, hinv, density=0.4, blocksize=16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The original passed the upper Cholesky factor of H^-1: same result.
    u = np.linalg.cholesky(hinv.astype(np.float64)).T.astype(np.float32)
    from_factor = prune_task_vector_with_error_correction(d, u, 0.4, blocksize=16)
    np.testing.assert_allclose(np.asarray(from_factor), np.asarray(want), rtol=1e-3, atol=1e-5)


def test_importance_scores_and_mask():
    w = np.array([[1.0, -2.0, 3.0], [0.5, 0.0, -4.0]])
    diag = np.array([1.0, 2.0, 0.5])
    s = np.asarray(compute_importance_scores(w, diag, eps=0.0))
    np.testing.assert_allclose(s, w**2 / diag**2)
    mask = np.asarray(generate_importance_mask(s, 0.5))
    # scores: [1, 1, 36; 0.25, 0, 64] -> keep the 3 largest; the tie at 1 goes to the first
    np.testing.assert_array_equal(mask, [[1, 0, 1], [0, 0, 1]])
    with pytest.warns(DeprecationWarning, match="prune_task_vector_with_error_correction"):
        trimmed = trim_with_sparsegpt_importance(w, diag, 0.5)
    np.testing.assert_allclose(np.asarray(trimmed), w * mask, atol=1e-7)


def test_bad_shapes_are_named():
    pruner = SparseGPTTaskVector((4, 8))
    with pytest.raises(ValueError, match="layer_shape"):
        SparseGPTTaskVector((4,))
    pruner.add_batch(np.ones((2, 3, 8)))
    with pytest.raises(ValueError, match=r"task_vector shape \(4, 9\)"):
        pruner.fasterprune(np.ones((4, 9)), 0.5)
    with pytest.raises(ValueError, match="batch .* NaN"):
        pruner.add_batch(np.full((1, 2, 8), np.inf))
