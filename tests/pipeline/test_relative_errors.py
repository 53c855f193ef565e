"""The report's relative output errors under H against a float64 NumPy oracle, trimmed and untrimmed;
its kept densities against counts and the eager per-task means they replace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgtv_jax.pipeline.report import kept_densities, relative_errors


def np_errors(d: np.ndarray, tr: np.ndarray, m: np.ndarray, w: np.ndarray, h: np.ndarray):
    def quad(a, hh):
        return float(np.trace(a @ hh @ a.T))

    te = [quad(tr[t] - d[t], h[t]) / quad(d[t], h[t]) for t in range(len(d))]
    target = np.tensordot(w, d, axes=1)
    hm = h.mean(0)
    return np.asarray(te), quad(m - target, hm) / quad(target, hm)


def test_trimmed_and_untrimmed_errors_match_numpy():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(3, 5, 4))
    x = rng.normal(size=(3, 4, 9))
    h = np.einsum("tik,tjk->tij", x, x)  # [T, in, in] PSD
    w = np.array([1.0, 0.5, 2.0])
    tr = d * (rng.random(d.shape) < 0.5)
    m = rng.normal(size=(5, 4))
    with jax.enable_x64(True):
        te, me = relative_errors(d, tr, m, w, h)
        te0, me0 = relative_errors(d, None, m, w, h)  # untrimmed (RegMean): no per-task products
        te_same, me_same = relative_errors(d, d, m, w, h)
    want_te, want_me = np_errors(d, tr, m, w, h)
    np.testing.assert_allclose(np.asarray(te), want_te, rtol=1e-12)
    np.testing.assert_allclose(float(me), want_me, rtol=1e-12)
    assert np.array_equal(np.asarray(te0), np.zeros(3)) and np.array_equal(np.asarray(te_same), np.zeros(3))
    assert float(me0) == float(me_same) == float(me)


@pytest.mark.parametrize("shape", [(3, 17), (3, 48, 20), (2, 4100, 4107)])  # the last: > 2**24 entries per task
def test_kept_densities_are_each_tasks_nonzero_fraction_bit_for_bit_as_the_eager_means(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(np.float32)
    x[rng.random(shape) < np.linspace(0.1, 0.9, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))] = 0
    got = np.asarray(kept_densities(jnp.asarray(x)))
    counts = (x != 0).reshape(shape[0], -1).sum(1) / np.prod(shape[1:])
    np.testing.assert_allclose(got, counts, rtol=1e-6)
    assert got.shape == (shape[0],) and len(set(np.round(counts, 2))) == shape[0]  # the tasks differ
    # the values the report wrote before (one eager mean per task), bit for bit
    assert [float(v) for v in got] == [float(jnp.mean(jnp.asarray(x[t]) != 0)) for t in range(shape[0])]
