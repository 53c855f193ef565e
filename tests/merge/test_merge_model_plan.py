"""`sgtv_jax.merge.merge` goes through `merge_planned`: N:M, refit, wanda norms, inverse Hessians.

Expectations are independent of the library: the float64 OBS oracle
(tests/helpers/oracle.py), a NumPy TIES (sign election on the weighted vectors,
disjoint weighted mean), a NumPy Wanda selection and the exact least-squares
values of the kept entries (float64 solve).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import sgtv_jax.merge as M
from tests.helpers import oracle

ROWS, COLS = 12, 32
W = "layers.0.mlp.weight"
B = "layers.0.mlp.bias"


def _models(tasks=2, seed=0):
    rng = np.random.default_rng(seed)
    base = {W: rng.standard_normal((ROWS, COLS)), B: rng.standard_normal(ROWS)}
    models = [{k: v + rng.standard_normal(v.shape) for k, v in base.items()} for _ in range(tasks)]
    x = oracle.correlated_inputs(rng, 4 * COLS, COLS)
    return base, models, 2 * x.T @ x / 4


def _ties(trimmed: np.ndarray, w: np.ndarray) -> np.ndarray:
    """TIES' sign election and weighted disjoint mean, float64 (a zero divisor counts as 1)."""
    wt = w[:, None, None] * trimmed
    sign = np.where(wt.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(wt) == sign) & (trimmed != 0)
    num = (agree * wt).sum(0)
    den = (agree * w[:, None, None]).sum(0)
    return num / np.where(den == 0, 1.0, den)


def _deltas(base, models, k):
    return np.stack([m[k] - base[k] for m in models])


def test_two_four_through_merge_matches_the_oracle_then_ties():
    base, models, h = _models()
    w = np.array([1.0, 0.5])
    with jax.enable_x64(True):
        out = M.merge(
            "ties",
            base,
            models,
            weights=list(w),
            hessians={W: h},
            prunen=2,
            prunem=4,
            blocksize=8,
            trim=[{"filter": "weight", "value": "sparsegpt"}, {"value": "magnitude"}],
        )
        got = np.asarray(out[W]) - base[W]
    d = _deltas(base, models, W)
    trimmed = np.stack([oracle.obs_prune(d[t], h, prunen=2, prunem=4, blocksize=8)[0] for t in range(2)])
    assert np.all((trimmed != 0).reshape(2, ROWS, -1, 4).sum(-1) == 2)
    np.testing.assert_allclose(got, _ties(trimmed, w), rtol=1e-9, atol=1e-9)
    # the bias has no Hessian: the rule gives it the data-free trim, density 1 = plain TIES
    np.testing.assert_allclose(
        np.asarray(out[B]) - base[B], _ties(_deltas(base, models, B)[..., None], w)[:, 0], rtol=1e-9, atol=1e-9
    )


def test_refit_through_merge_keeps_the_oracle_mask_and_solves_the_kept_entries():
    base, models, h = _models(tasks=1, seed=1)
    d = _deltas(base, models, W)[0]
    with jax.enable_x64(True):
        got = {
            r: np.asarray(
                M.merge(
                    "task_arithmetic",
                    {W: base[W]},
                    [{W: models[0][W]}],
                    densities=0.3,
                    trim="sparsegpt",
                    hessians={W: h},
                    blocksize=16,
                    refit=r,
                )[W]
            )
            - base[W]
            for r in (False, True)
        }
    q, pruned, _ = oracle.obs_prune(d, h, density=0.3, blocksize=16)
    np.testing.assert_allclose(got[False], q, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(got[True] == 0, pruned)
    # exact least squares on the kept set K of each row: H_d[K, K] q_K = (H_d d)_K, H_d the damped H
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(COLS)
    err = lambda e: float(np.einsum("ri,ij,rj->", e, hd, e))  # noqa: E731
    best = np.zeros_like(d)
    for r in range(ROWS):
        k = ~pruned[r]
        best[r, k] = np.linalg.solve(hd[np.ix_(k, k)], (hd @ d[r])[k])
    assert err(got[True] - d) <= err(best - d) * (1 + 1e-6)
    assert err(got[True] - d) < 0.99 * err(got[False] - d)


def test_wanda_norms_through_merge_match_a_numpy_selection():
    base, models, _ = _models(seed=2)
    rng = np.random.default_rng(3)
    norms = np.abs(rng.standard_normal(COLS)) + 0.1
    out = M.merge(
        "ties",
        base,
        models,
        densities=0.25,
        norms={W: norms},
        trim=[{"filter": "weight", "value": "wanda"}, {"value": "magnitude"}],
    )
    d = _deltas(base, models, W)
    keep = round(0.25 * COLS)
    trimmed = np.zeros_like(d)
    for t in range(2):
        for r in range(ROWS):
            score = np.abs(d[t, r]) * norms
            top = np.argsort(-score, kind="stable")[:keep]
            trimmed[t, r, top] = d[t, r, top]
    np.testing.assert_allclose(np.asarray(out[W]) - base[W], _ties(trimmed, np.ones(2)), rtol=1e-5, atol=1e-5)


def test_sparsegpt_from_inverse_hessians_matches_the_oracle_factor():
    base, models, h = _models(seed=4)
    hinv = np.linalg.inv(h + 0.01 * np.mean(np.diag(h)) * np.eye(COLS))
    with jax.enable_x64(True):
        out = M.merge(
            "task_arithmetic",
            {W: base[W]},
            [{W: m[W]} for m in models],
            densities=[0.5, 0.25],
            trim="sparsegpt",
            hessian_invs={W: hinv},
            blocksize=8,
        )
        got = np.asarray(out[W]) - base[W]
    d = _deltas(base, models, W)
    u = np.linalg.cholesky(hinv).T
    want = sum(oracle.obs_prune(d[t], None, density=dens, blocksize=8, u=u)[0] for t, dens in enumerate((0.5, 0.25)))
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


def test_obs_options_are_checked_before_merging():
    base, models, h = _models()
    kw = dict(trim="sparsegpt", hessians={W: h}, densities=0.5)
    with pytest.raises(ValueError, match="prunen and prunem go together"):
        M.merge("ties", {W: base[W]}, [{W: m[W]} for m in models], prunen=2, **kw)
    with pytest.raises(ValueError, match="blocksize 6 must be a multiple of prunem 4"):
        M.merge("ties", {W: base[W]}, [{W: m[W]} for m in models], prunen=2, prunem=4, blocksize=6, **kw)
    with pytest.raises(ValueError, match="refit needs the Hessian itself"):
        M.merge(
            "ties",
            {W: base[W]},
            [{W: m[W]} for m in models],
            trim="sparsegpt",
            hessian_invs={W: h},
            densities=0.5,
            refit=True,
        )
    with pytest.raises(ValueError, match="need trim='sparsegpt'"):
        M.merge("ties", base, models, prunen=2, prunem=4)
    with pytest.raises(ValueError, match="method 'linear' has no parameter\\(s\\) \\['prunem', 'prunen'\\]"):
        M.merge("linear", base, models, prunen=2, prunem=4)
    with pytest.raises(ValueError, match="'layers.0.mlp.weight' has 32 input columns, not a multiple of prunem 3"):
        M.merge(
            "ties",
            {W: base[W]},
            [{W: m[W]} for m in models],
            prunen=1,
            prunem=3,
            blocksize=9,
            trim="sparsegpt",
            hessians={W: h},
        )


def test_density_without_a_trim_is_refused_up_front():
    base, models, _ = _models()
    with pytest.raises(ValueError, match="does not trim by itself: pass trim="):
        M.merge("task_arithmetic", base, models, densities=0.5)
