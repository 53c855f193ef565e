"""slerp, nuslerp, multislerp, karcher, model_stock, sce, nearswap, arcee_fusion, passthrough.

Each against a plain float64 NumPy reference written from the method's
definition (mergekit's documented semantics), hand-worked cases, and the same
call under jit / vmap with traced parameters. Config: `trim` composes with the
task-vector method (sce) and is refused, by name, for the others.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgtv_jax.merge import registry, specs
from sgtv_jax.merge.adamerging import adamerging
from sgtv_jax.merge.arcee_fusion import arcee_fusion
from sgtv_jax.merge.core_space import core_space
from sgtv_jax.merge.hessian_fit import lstsq, regmean_sparse, regmean_trim
from sgtv_jax.merge.interpolation import karcher, multislerp, nuslerp, slerp
from sgtv_jax.merge.iso import iso_c, iso_cts
from sgtv_jax.merge.model_stock import model_stock
from sgtv_jax.merge.nearswap import nearswap
from sgtv_jax.merge.passthrough import passthrough
from sgtv_jax.merge.ram import ram, ramplus_tl
from sgtv_jax.merge.sce import sce
from sgtv_jax.merge.tsv import tsv
from sgtv_jax.merge.wudi import wudi
from sgtv_jax.pipeline.config import ConfigError, parse_config

RNG = np.random.default_rng(0)
BASE = RNG.standard_normal((6, 10)).astype(np.float32)
TAUS = (0.3 * RNG.standard_normal((3, 6, 10))).astype(np.float32)
_X = RNG.standard_normal((3, 10, 40)).astype(np.float32)
GRAMS = np.einsum("tik,tjk->tij", _X, _X) / 40  # per-task X_t X_t^T, [T, in, in]


def close(got, want, tol=2e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


# ----------------------------------------------------------------- float64 references


def ref_slerp(t, v0, v1):
    v0, v1 = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > 1e-8 else v0
    u1 = v1 / n1 if n1 > 1e-8 else v1
    c = np.sum(u0 * u1)
    if abs(c) > 0.9995:
        return (1 - t) * v0 + t * v1
    a = math.acos(c)
    return math.sin((1 - t) * a) / math.sin(a) * v0 + math.sin(t * a) / math.sin(a) * v1


def ref_nuslerp_vec(t, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ua = a / max(np.linalg.norm(a), 1e-7)
    ub = b / max(np.linalg.norm(b), 1e-7)
    th = math.acos(min(1.0, max(-1.0, float(np.sum(ua * ub)))))
    if abs(math.sin(th)) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def ref_multislerp(taus, w, normalize=True, eps=1e-8):
    x = np.asarray(taus, np.float64).reshape(len(taus), -1)
    w = np.asarray(w, np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(x, axis=1)
    u = x / (norms[:, None] + eps)
    m = (w[:, None] * u).sum(0)
    m = m / np.linalg.norm(m)
    g = sum(w[i] * (u[i] - np.dot(u[i], m) * m) for i in range(len(x)))
    n = np.linalg.norm(g) + eps
    return ((m * math.cos(n) + g * math.sin(n) / n) * np.dot(norms, w)).reshape(np.shape(taus)[1:])


def ref_karcher(points, alphas, max_iter=10, tol=1e-5):
    pts = [np.asarray(p, np.float64).ravel() for p in points]
    norms = [np.linalg.norm(p) for p in pts]
    units = [p / n if n > 0 else p * 0 for p, n in zip(pts, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = np.array([alphas[i] for i in valid]) / sum(alphas[i] for i in valid)
    us = [units[i] for i in valid]
    u = sum(ai * ui for ai, ui in zip(a, us))
    u = us[0] if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        T = np.zeros_like(u)
        for ai, ui in zip(a, us):
            d = min(1.0, max(-1.0, float(np.dot(u, ui))))
            th = math.acos(d)
            if th >= tol:
                T += ai * th / math.sin(th) * (ui - d * u)
        nt = np.linalg.norm(T)
        if nt < tol:
            break
        u = math.cos(nt) * u + math.sin(nt) * T / nt
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return (sum(al * n for al, n in zip(alphas, norms)) * u).reshape(np.shape(points[0]))


def ref_model_stock(taus, filter_wise=False):
    x = np.asarray(taus, np.float64)
    v = x.reshape(len(x), -1, x.shape[-1]) if filter_wise else x.reshape(len(x), 1, -1)
    rows = []
    for r in range(v.shape[1]):
        cs = []
        for i in range(len(x)):
            for j in range(i + 1, len(x)):
                c = np.dot(v[i, r], v[j, r]) / max(np.linalg.norm(v[i, r]) * np.linalg.norm(v[j, r]), 1e-6)
                cs.append(min(1.0, max(-1.0, c)))
        c = np.mean(cs)
        n = len(x)
        rows.append(n * c / (1 + (n - 1) * c) * v[:, r].mean(0))
    return np.stack(rows).reshape(x.shape[1:])


def ref_sce(taus, select_topk=1.0, w=None):
    x = np.asarray(taus, np.float64).copy()
    t = len(x)
    if select_topk < 1:
        var = x.var(0).ravel()
        k = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
        keep = np.zeros(var.size, bool)
        keep[np.argsort(-np.abs(var), kind="stable")[:k]] = True
        x = x * keep.reshape(x.shape[1:])
    elected = np.where(x.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(x) == elected
    ms = (x.reshape(t, -1) ** 2).mean(1)
    c = np.full(t, 1.0 / t) if abs(ms.sum()) < 1e-6 else ms / ms.sum()
    if w is not None:
        c = c * np.asarray(w)
    c = c.reshape((-1,) + (1,) * (x.ndim - 1)) * agree
    return (x * c).sum(0) / np.maximum(c.sum(0), 1e-6)


def ref_arcee(tau, base):
    tau, base = np.asarray(tau, np.float64), np.asarray(base, np.float64)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(base + tau) + 1e-8, softmax(base) + 1e-8
    imp = np.abs(tau) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(imp.ravel())
    n = s.size

    def at(qq):
        return s[int(np.float32(qq) * np.float32(n - 1))]

    thr = at(0.5) + 1.5 * (at(0.75) - at(0.25))
    return np.where(imp >= thr, tau, 0.0), imp, thr


# ----------------------------------------------------------------- slerp


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.4])
def test_slerp_reference(t):
    got = slerp(TAUS[:1], [1.0], t=t, base=BASE)
    close(got, ref_slerp(t, BASE, BASE + TAUS[0].astype(np.float64)) - BASE)


def test_slerp_orthogonal_unit_vectors_by_hand():
    e1, e2 = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    merged = e1 + np.asarray(slerp((e2 - e1)[None], t=0.5, base=e1))
    close(merged, [math.sqrt(0.5), math.sqrt(0.5)], 1e-6)
    merged = e1 + np.asarray(slerp((e2 - e1)[None], t=1 / 3, base=e1))
    close(merged, [math.cos(math.pi / 6), math.sin(math.pi / 6)], 1e-6)


def test_slerp_near_parallel_falls_back_to_linear():
    d = 1e-3 * BASE + 1e-5 * TAUS[0]  # cos > 0.9995
    u = BASE.ravel() / np.linalg.norm(BASE)
    v = (BASE + d).ravel() / np.linalg.norm(BASE + d)
    assert np.dot(u, v) > 0.9995
    np.testing.assert_allclose(np.asarray(slerp(d[None], t=0.3, base=BASE)), 0.3 * d, rtol=1e-6)


def test_slerp_zero_base_norm_is_the_angle_pi_over_2():
    d = TAUS[:1, 0]
    got = slerp(d, t=0.25, base=np.zeros_like(d[0]))
    close(got, math.sin(0.25 * math.pi / 2) * d[0].astype(np.float64), 1e-6)


def test_slerp_errors():
    with pytest.raises(ValueError, match="needs t"):
        slerp(TAUS[:1], base=BASE)
    with pytest.raises(ValueError, match="needs base"):
        slerp(TAUS[:1], t=0.5)
    with pytest.raises(ValueError, match="exactly 2 models"):
        slerp(TAUS[:2], t=0.5, base=BASE)
    with pytest.raises(ValueError, match="no per-model weight"):
        slerp(TAUS[:1], [0.5], t=0.5, base=BASE)


# ----------------------------------------------------------------- nuslerp / multislerp / karcher


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_reference(flatten, row_wise):
    w = [1.0, 3.0]
    got = nuslerp(TAUS[:2], w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    a, b = TAUS[0], TAUS[1]
    if flatten:
        want = ref_nuslerp_vec(0.75, a.ravel(), b.ravel()).reshape(a.shape)
    elif row_wise:
        want = np.stack([ref_nuslerp_vec(0.75, a[:, j], b[:, j]) for j in range(a.shape[1])], axis=1)
    else:
        want = np.stack([ref_nuslerp_vec(0.75, a[i], b[i]) for i in range(a.shape[0])])
    close(got, want)


def test_nuslerp_by_hand_and_zero_weight_sum():
    e = np.eye(2, dtype=np.float32)
    close(nuslerp(e, [1.0, 3.0]), [math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)], 1e-6)
    close(nuslerp(e, [1.0, -1.0]), [math.sqrt(0.5), math.sqrt(0.5)], 1e-6)  # |sum| < 1e-6: t = 0.5
    # colinear rows interpolate linearly
    par = np.stack([e[0], 2 * e[0]])
    close(nuslerp(par, [1.0, 1.0]), [1.5, 0.0], 1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_reference(normalize):
    w = [0.2, 0.5, 0.3] if normalize else [0.3, 0.4, 0.2]
    close(multislerp(TAUS, w, normalize_weights=normalize), ref_multislerp(TAUS, w, normalize))


def test_multislerp_two_orthogonal_is_the_slerp_midpoint_and_degenerate_cases():
    e = np.eye(2, dtype=np.float32)
    close(multislerp(e, [1.0, 1.0]), [math.sqrt(0.5), math.sqrt(0.5)], 1e-6)
    anti = np.stack([e[0], -e[0]])
    close(multislerp(anti, [1.0, 1.0]), [0.0, 0.0], 1e-7)  # two antipodal: linear fallback
    with pytest.raises(ValueError, match="weighted sum of the unit task vectors is zero"):
        multislerp(np.stack([e[0], -e[0], e[0] * 0]), [1.0, 1.0, 1.0])
    close(multislerp(TAUS[:1], [2.0]), TAUS[0], 0)


def test_karcher_reference():
    pts = [BASE + TAUS[t] for t in range(3)]
    close(karcher(TAUS, base=BASE), ref_karcher(pts, [1 / 3] * 3) - BASE, 1e-4)
    w = [0.5, 1.0, 2.0]
    close(karcher(TAUS, w, base=BASE, max_iter=3), ref_karcher(pts, np.array(w) / 3.5, max_iter=3) - BASE, 1e-4)


def test_karcher_of_two_points_is_the_slerp_midpoint():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(20)
    b = rng.standard_normal(20)
    b = b / np.linalg.norm(b) * np.linalg.norm(a)  # equal norms
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    got = np.asarray(karcher(np.stack([a32, b32]) - a32, base=a32)) + a32
    close(got, ref_slerp(0.5, a, b), 1e-5)


def test_karcher_zero_norm_points_are_left_out_but_count_in_the_scale():
    e = np.eye(3, dtype=np.float32)
    pts = np.stack([e[0], e[1], np.zeros(3, np.float32)])
    got = np.asarray(karcher(pts, base=np.zeros(3, np.float32)))
    # the two unit points' midpoint, scaled by sum a_t n_t = 2/3
    close(got, 2 / 3 * np.array([math.sqrt(0.5), math.sqrt(0.5), 0.0]), 1e-6)
    close(karcher(np.zeros((2, 3), np.float32), base=np.zeros(3, np.float32)), np.zeros(3), 0)


# ----------------------------------------------------------------- model_stock


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_reference(filter_wise):
    close(model_stock(TAUS, filter_wise=filter_wise), ref_model_stock(TAUS, filter_wise))


def test_model_stock_t_from_the_angle_by_hand():
    # 60 degrees apart: cos = 1/2, N = 2 -> t = 2 * 0.5 / 1.5 = 2/3
    a = np.array([1.0, 0.0], np.float32)
    b = np.array([0.5, math.sqrt(3) / 2], np.float32)
    close(model_stock(np.stack([a, b])), 2 / 3 * (a + b) / 2, 1e-6)
    # identical task vectors: cos 1 -> t 1 -> their mean
    close(model_stock(np.stack([a, a, a])), a, 1e-6)
    # orthogonal: cos 0 -> t 0 -> the base
    close(model_stock(np.eye(2, dtype=np.float32)), [0.0, 0.0], 0)
    with pytest.raises(ValueError, match="-1/\\(N-1\\)"):
        model_stock(np.stack([a, -a]))
    with pytest.raises(ValueError, match="at least two"):
        model_stock(a[None])


# ----------------------------------------------------------------- sce


@pytest.mark.parametrize("topk", [1.0, 0.4, 0.0])
def test_sce_reference(topk):
    close(sce(TAUS, select_topk=topk), ref_sce(TAUS, topk))


def test_sce_small_mean_squares_take_equal_weights_and_user_weights_multiply():
    small = TAUS * 1e-3  # mean squares ~1e-7: below mergekit's 1e-6 floor -> weights 1/T
    close(sce(small), ref_sce(small), 1e-9)
    close(sce(TAUS, [1.0, 0.5, 2.0]), ref_sce(TAUS, w=[1.0, 0.5, 2.0]))


def test_sce_by_hand():
    tv = np.array([[2.0, -1.0], [-1.0, -1.0]], np.float32)
    # mean squares [2.5, 1] -> c = [5/7, 2/7]; sums [1, -2] -> elected [+, -]
    # entry 0: only task 0 agrees -> 2; entry 1: both agree -> -1
    close(sce(tv), [2.0, -1.0], 1e-6)


def test_sce_composes_with_a_trim():
    from sgtv_jax.merge import trim as trim_lib

    trimmed = np.asarray(trim_lib.trim("magnitude", jnp.asarray(TAUS), [0.5, 0.5, 0.5]))
    close(sce(TAUS, [1.0] * 3, 0.5, trim="magnitude", select_topk=0.6), ref_sce(trimmed, 0.6))
    with pytest.raises(ValueError, match="no trim"):
        sce(TAUS, [1.0] * 3, 0.5)


# ----------------------------------------------------------------- nearswap / arcee_fusion / passthrough


def test_nearswap_by_hand_and_reference():
    tau = np.array([[0.1, 1.0, -4.0, 0.0]], np.float32)
    close(nearswap(tau, t=0.5), [0.1, 0.5, -0.5, 0.0], 1e-7)
    want = np.clip(0.2 / np.maximum(np.abs(TAUS[0].astype(np.float64)), 1e-6), 0, 1) * TAUS[0]
    close(nearswap(TAUS[:1], t=0.2), want, 1e-6)
    with pytest.raises(ValueError, match=">= 0"):
        nearswap(tau, t=-1.0)


def test_arcee_fusion_reference_keeps_the_outliers():
    want, imp, thr = ref_arcee(TAUS[0], BASE)
    got = np.asarray(arcee_fusion(TAUS[:1], base=BASE))
    np.testing.assert_array_equal(got != 0, want != 0)
    close(got, want, 0)
    assert 0 < np.mean(got != 0) < 0.5  # an upper tail, not everything
    vec = np.asarray(arcee_fusion(TAUS[:1, 0], base=BASE[0]))
    close(vec, ref_arcee(TAUS[0, 0], BASE[0])[0], 0)


def test_passthrough_scale():
    close(passthrough(TAUS[:1]), TAUS[0], 0)
    merged = BASE + np.asarray(passthrough(TAUS[:1], scale=0.5, base=BASE))
    close(merged, 0.5 * (BASE.astype(np.float64) + TAUS[0]), 1e-6)
    with pytest.raises(ValueError, match="needs base"):
        passthrough(TAUS[:1], scale=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        passthrough(TAUS[:2])


# ----------------------------------------------------------------- jit / vmap


CASES = {
    "slerp": (slerp, TAUS[:1], dict(base=BASE, t=0.4), "t", [0.2, 0.7]),
    "nuslerp": (nuslerp, TAUS[:2], {}, "weights", [[1.0, 2.0], [3.0, 1.0]]),
    "multislerp": (multislerp, TAUS, {}, "weights", [[1.0, 2.0, 1.0], [0.5, 0.2, 0.3]]),
    "karcher": (karcher, TAUS, dict(base=BASE), "tol", [1e-5, 1e-3]),
    "model_stock": (model_stock, TAUS, dict(filter_wise=True), None, None),
    "sce": (sce, TAUS, {}, "select_topk", [0.3, 0.8]),
    "nearswap": (nearswap, TAUS[:1], dict(t=0.1), "t", [0.05, 0.3]),
    "arcee_fusion": (arcee_fusion, TAUS[:1], dict(base=BASE), None, None),
    "passthrough": (passthrough, TAUS[:1], dict(base=BASE), "scale", [0.5, 2.0]),
    # the Hessian-fit methods: per-task Grams X_t X_t^T; `trim=None` keeps them dense and comparable
    "lstsq": (lstsq, TAUS, dict(grams=GRAMS, targets=TAUS, trim=None), None, None),
    "regmean_trim": (regmean_trim, TAUS, dict(grams=GRAMS, trim=None), "alpha", [0.5, 0.9]),
    "regmean_sparse": (regmean_sparse, TAUS, dict(grams=GRAMS, trim=None), "alpha", [0.5, 0.9]),
    "ram": (ram, TAUS, {}, "threshold", [0.1, 0.3]),
    "core_space": (core_space, TAUS, {}, None, None),
    "ramplus_tl": (ramplus_tl, TAUS, dict(threshold=0.2), "r", [0.1, 0.5]),
    # Adam from the sum; its step size may be traced
    "wudi": (wudi, TAUS, dict(steps=20), "learning_rate", [1e-3, 5e-3]),
    # SVD methods (their float64 references: tests/merge/test_tsv_iso.py); alpha may be traced
    "tsv": (tsv, TAUS, {}, "alpha", [0.5, 2.0]),
    "iso_c": (iso_c, TAUS, {}, "alpha", [0.5, 2.0]),
    "iso_cts": (iso_cts, TAUS, dict(common_space_fraction=0.5), "alpha", [0.5, 2.0]),
    # per tensor: task arithmetic with the learned coefficients as weights
    "adamerging": (
        adamerging,
        TAUS,
        dict(trim="magnitude", densities=0.5),
        "weights",
        [[0.2, 0.9, 0.4], [1.0, 0.0, 0.3]],
    ),
}


def test_every_new_method_has_a_transform_case():
    # the task-vector methods before these have theirs in tests/core/test_transforms.py
    older = {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "regmean",
        "magnitude_linear",  # a task-vector variant too: tests/test_transforms.py
    }
    assert set(CASES) == set(registry.METHODS) - older


@pytest.mark.parametrize("name", list(CASES))
def test_jit_and_vmap_over_a_traced_parameter_equal_eager(name):
    fn, deltas, kw, param, values = CASES[name]
    w1 = [1.0] * deltas.shape[0]
    eager_plain = fn(deltas, w1, **kw)
    close(jax.jit(lambda d: fn(d, w1, **kw))(jnp.asarray(deltas)), np.asarray(eager_plain, np.float64), 1e-5)
    # vmap over the task vectors (a batch of tensors)
    batch = jnp.stack([jnp.asarray(deltas), 2 * jnp.asarray(deltas)])
    kwb = dict(kw)
    if "base" in kwb:
        kwb["base"] = jnp.stack([jnp.asarray(BASE)] * 2)
        got = jax.vmap(lambda d, b: fn(d, w1, **{**kw, "base": b}))(batch, kwb["base"])
    else:
        got = jax.vmap(lambda d: fn(d, w1, **kw))(batch)
    for i in range(2):
        close(got[i], np.asarray(fn(np.asarray(batch[i]), w1, **kw), np.float64), 1e-5)
    if param is None:
        return
    vals = jnp.asarray(values, jnp.float32)
    if param == "weights":
        grid = jax.jit(jax.vmap(lambda v: fn(deltas, v, **kw)))(vals)
        eager = [fn(deltas, [float(x) for x in v], **kw) for v in values]
    else:
        grid = jax.jit(jax.vmap(lambda v: fn(deltas, w1, **{**kw, param: v})))(vals)
        eager = [fn(deltas, w1, **{**kw, param: float(np.float32(v))}) for v in values]
    for i in range(len(values)):
        close(grid[i], np.asarray(eager[i], np.float64), 1e-5)


def test_slerp_gradient_in_t_matches_finite_differences():
    with jax.enable_x64(True):
        d, b = jnp.asarray(TAUS[:1], jnp.float64), jnp.asarray(BASE, jnp.float64)
        c = jnp.asarray(np.random.default_rng(9).standard_normal(BASE.shape))

        def f(t):
            return jnp.sum(c * slerp(d, t=t, base=b))

        g = jax.grad(f)(0.3)
        fd = (f(0.3 + 1e-6) - f(0.3 - 1e-6)) / 2e-6
        np.testing.assert_allclose(float(g), float(fd), rtol=1e-6)


# ----------------------------------------------------------------- config


def _raw(method, n_models=1, **over):
    raw = {"models": [{"model": f"ft_{i}"} for i in range(n_models)], "merge_method": method, "base_model": "base"}
    raw.update(over)
    return raw


@pytest.mark.parametrize(
    "method", ["slerp", "karcher", "nearswap", "model_stock", "arcee_fusion", "passthrough", "nuslerp", "multislerp"]
)
def test_config_refuses_trim_for_methods_not_on_task_vector_trims(method, tmp_path):
    spec = specs.METHOD_SPECS[method]
    params = {p.name: 0.5 for p in spec.params if p.required}
    raw = _raw(method, max(spec.min_models, 1), parameters=params, trim="magnitude")
    with pytest.raises(ConfigError, match=f"merge_method '{method}' does not trim"):
        parse_config(raw, tmp_path)
    del raw["trim"]
    assert parse_config(raw, tmp_path).merge_method == method


def test_config_sce_composes_with_sparsegpt(tmp_path):
    cfg = parse_config(
        _raw("sce", 2, trim="sparsegpt", calibration={"data": "c.txt"}, parameters={"select_topk": 0.5}), tmp_path
    )
    assert cfg.trim == "sparsegpt" and cfg.method_spec.trims


def test_config_required_parameter_model_counts_and_refused_names(tmp_path):
    with pytest.raises(ConfigError, match="parameters.t is required by merge_method 'slerp'"):
        parse_config(_raw("slerp"), tmp_path)
    with pytest.raises(ConfigError, match="'slerp' merges exactly 1 model"):
        parse_config(_raw("slerp", 2, parameters={"t": 0.5}), tmp_path)
    with pytest.raises(ConfigError, match="'model_stock' merges at least 2"):
        parse_config(_raw("model_stock", 1), tmp_path)
    with pytest.raises(ConfigError, match="'cabs' is not supported: not in mergekit's registry"):
        parse_config(_raw("cabs", 2), tmp_path)
    with pytest.raises(ConfigError, match=r"parameters.t must be >= 0.0, got -1.0"):
        parse_config(_raw("nearswap", parameters={"t": -1.0}), tmp_path)
    # a gradient of t over layers is a float parameter like any other
    assert parse_config(_raw("slerp", parameters={"t": [0, 0.5, 1]}), tmp_path).parameters["t"] == [0, 0.5, 1]


# ----------------------------------------------------------------- sgtv methods


def test_sgtv_methods_lists_every_method_parameter_and_refusal(capsys):
    from sgtv_jax.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    sections = {}
    for block in out.split("\n\n"):
        head = block.split(":", 1)[0]
        sections[head] = block
    for name, spec in specs.METHOD_SPECS.items():
        assert name in sections, name
        for ps in spec.params:
            line = next(x for x in sections[name].splitlines() if x.split() and x.split()[0] == ps.name)
            assert ps.kind in line and ps.doc in line
            assert ("required" in line) if ps.required else ("default" in line)
        assert ("trim: refused" in sections[name]) != spec.trims
    for ps in specs.PER_MODEL_PARAMS:
        assert f"    {ps.name} " in out
    for name, why in specs.REFUSED.items():
        assert f"{name} ({why})" in out


def test_whole_model_merge_passes_the_base_to_methods_on_weights():
    from sgtv_jax.merge import merge

    base = {"w": BASE, "b": BASE[0]}
    ft = {"w": BASE + TAUS[0], "b": BASE[0] + TAUS[0, 0]}
    out = merge("slerp", base, [ft], t=0.3)
    close(out["w"], ref_slerp(0.3, BASE, ft["w"].astype(np.float64)), 1e-5)
    close(out["b"], ref_slerp(0.3, BASE[0], ft["b"].astype(np.float64)), 1e-5)
    # flax layout: the base is transposed with the task vectors (row-wise arcee_fusion notices)
    got = merge("arcee_fusion", {"k": BASE.T}, [{"k": (BASE + TAUS[0]).T}], layout="flax")["k"]
    close(got, BASE.T + ref_arcee(TAUS[0], BASE)[0].T, 1e-6)
