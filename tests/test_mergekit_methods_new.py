"""Methods mergekit added after 0.1.5: RAM and RAM+ tensor-local (`mergekit/merge_methods/ram.py`).

Each against a float64 NumPy reference written from mergekit's source (its
masks, counts and clamps, step by step), hand-worked cases, the same call
under `jax.jit` with traced parameters, and `sgtv merge` on a tiny model.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sgtv_jax.merge.ram import ram, ramplus_tl

RNG = np.random.default_rng(7)


def _taus(shape=(3, 8, 12), density=0.4) -> np.ndarray:
    """Sparse-ish task vectors: tiny entries (below epsilon) and exact zeros where they do not contribute."""
    x = RNG.standard_normal(shape) * 0.05
    x[RNG.random(shape) > density] = 0.0
    x[RNG.random(shape) < 0.1] = 3e-6  # below the default epsilon: no contribution
    return x.astype(np.float32)


def ref_ram(taus, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    """mergekit's `_prepare_ram_vectors` then `ram_merge` / `ramplus_tl_merge`, in float64."""
    tv = np.asarray(taus, np.float64).reshape(len(taus), -1)
    nz = np.abs(tv) > epsilon
    counts = nz.sum(0, keepdims=True)
    overlap, unique = counts > 1, counts == 1
    z = tv * nz
    lam = np.ones((len(tv), 1))
    if plus:
        shared_c = (nz & overlap).sum(1)
        unique_c = (nz & unique).sum(1)
        rho = shared_c / np.maximum(unique_c, epsilon)
        lam = (1 + r * np.minimum(np.maximum(rho, 0), alpha))[:, None]
    out = (z * unique * lam + z * overlap / np.maximum(counts, 1)).sum(0)
    return out.reshape(np.shape(taus)[1:])


@pytest.mark.parametrize("epsilon", [1e-5, 0.02, 0.0])
def test_ram_reference(epsilon):
    x = _taus()
    np.testing.assert_allclose(
        np.asarray(ram(x, epsilon=epsilon), np.float64), ref_ram(x, epsilon), rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("r,alpha,epsilon", [(0.1, 0.2, 1e-5), (0.5, 3.0, 0.01), (1.0, 0.0, 1e-5)])
def test_ramplus_tl_reference(r, alpha, epsilon):
    x = _taus()
    want = ref_ram(x, epsilon, plus=True, r=r, alpha=alpha)
    got = np.asarray(ramplus_tl(x, r=r, alpha=alpha, epsilon=epsilon), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_ram_by_hand():
    tau = np.array([[0.5, 0.2, 0.0, 1e-6], [0.1, 0.0, -0.4, 1e-6]], np.float32)
    # shared entry 0 -> mean 0.3; unique entries kept; entry 3 below epsilon -> 0
    np.testing.assert_allclose(np.asarray(ram(tau)), [0.3, 0.2, -0.4, 0.0], rtol=1e-6)
    # RAM+: each task has 1 shared and 1 unique entry -> rho 1 -> lambda 1 + 0.1 * min(1, 0.2) = 1.02
    np.testing.assert_allclose(np.asarray(ramplus_tl(tau)), [0.3, 0.2 * 1.02, -0.4 * 1.02, 0.0], rtol=1e-6)
    # a task with no unique entry: rho = shared / epsilon, clipped at alpha
    only_shared = np.array([[0.5, 0.2], [0.1, 0.3]], np.float32)
    np.testing.assert_allclose(np.asarray(ramplus_tl(only_shared)), [0.3, 0.25], rtol=1e-6)


def test_ram_refuses_weights_and_bad_epsilon():
    x = _taus()
    with pytest.raises(ValueError, match="takes no per-model weight"):
        ram(x, [1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0"):
        ram(x, epsilon=-1.0)


def test_ram_under_jit_with_traced_parameters():
    x = _taus()
    f = jax.jit(lambda d, e: ram(d, epsilon=e))
    np.testing.assert_allclose(np.asarray(f(x, 0.02), np.float64), ref_ram(x, 0.02), rtol=1e-6, atol=1e-9)
    g = jax.jit(lambda d, r, a, e: ramplus_tl(d, r=r, alpha=a, epsilon=e))
    want = ref_ram(x, 0.01, plus=True, r=0.5, alpha=3.0)
    np.testing.assert_allclose(np.asarray(g(x, 0.5, 3.0, 0.01), np.float64), want, rtol=1e-6, atol=1e-9)
    batched = jax.vmap(lambda e: ram(x, epsilon=e))(np.array([1e-5, 0.02], np.float32))
    np.testing.assert_allclose(np.asarray(batched[1], np.float64), ref_ram(x, 0.02), rtol=1e-6, atol=1e-9)
