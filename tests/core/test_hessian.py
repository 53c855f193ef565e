"""Hessian accumulation against the float64 oracle: running mean, masks, norms, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgtv_jax import hessian_finalize, hessian_init, hessian_update, input_norms
from tests.helpers import oracle


def test_running_mean_over_sequences_with_mask():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((b, 7, 12)) for b in (3, 1, 4)]
    masks = [rng.random((b, 7)) > 0.3 for b in (3, 1, 4)]
    with jax.enable_x64(True):
        state = hessian_init(12)
        assert state.hessian.dtype == jnp.float64
        for x, m in zip(batches, masks):
            state = hessian_update(state, x, m)
        h = np.asarray(hessian_finalize(state))
    assert float(state.nsamples) == 8
    np.testing.assert_allclose(h, oracle.hessian(batches, masks), rtol=1e-12)


def test_float32_and_two_d_input_counts_one_sequence():
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((50, 16)).astype(np.float32)
    state = hessian_update(hessian_init(16), tokens)
    assert state.hessian.dtype == jnp.float32
    assert float(state.nsamples) == 1
    np.testing.assert_allclose(np.asarray(state.hessian), oracle.hessian([tokens[None]]), rtol=1e-5, atol=1e-5)


def test_padding_mask_equals_dropping_tokens():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 8)).astype(np.float32)
    mask = np.ones((2, 9), bool)
    mask[0, 6:] = False
    x_garbage = x.copy()
    x_garbage[0, 6:] = 1e6  # padding content must not leak in
    h_masked = hessian_update(hessian_init(8), x_garbage, mask).hessian
    expected = (2 / 2) * (np.einsum("ti,tj->ij", x[0, :6], x[0, :6]) + np.einsum("ti,tj->ij", x[1], x[1]))
    np.testing.assert_allclose(np.asarray(h_masked), expected, rtol=1e-5, atol=1e-4)


def test_input_norms_are_wanda_norms():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 10, 6))
    with jax.enable_x64(True):
        h = hessian_update(hessian_init(6), x).hessian
        norms = np.asarray(input_norms(h))
    # Wanda: ||X_j||_2 over all tokens, here as a mean over the 4 sequences.
    np.testing.assert_allclose(norms, np.sqrt((x**2).sum(axis=(0, 1)) / 4), rtol=1e-12)


def test_bad_inputs():
    state = hessian_init(8)
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, 8\]"):
        hessian_update(state, np.ones((2, 3, 7)))
    with pytest.raises(ValueError, match="mask must have shape"):
        hessian_update(state, np.ones((2, 3, 8)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="cols must be a positive integer"):
        hessian_init(0)
    bad = hessian_update(hessian_init(8), np.full((1, 2, 8), np.nan))
    with pytest.raises(ValueError, match="hessian .* NaN or Inf"):
        hessian_finalize(bad)


def test_float_mask_weights_each_token_by_its_square():
    """A float mask w (routing weights) gives (2/n_sequences) sum w^2 x x^T; n still counts sequences."""
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((b, 5, 6)) for b in (2, 3)]
    ws = [rng.random((b, 5)) * (rng.random((b, 5)) > 0.4) for b in (2, 3)]
    with jax.enable_x64(True):
        state = hessian_init(6)
        for x, w in zip(xs, ws):
            state = hessian_update(state, x, w)
        h = np.asarray(hessian_finalize(state))
    expected = sum(np.einsum("bt,bti,btj->ij", w**2, x, x) for x, w in zip(xs, ws)) * 2.0 / 5
    assert float(state.nsamples) == 5
    np.testing.assert_allclose(h, expected, rtol=1e-12)
