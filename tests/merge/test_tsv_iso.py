"""TSV-M (`tsv`), Iso-C (`iso_c`) and Iso-CTS (`iso_cts`) against float64 NumPy references, invariants, `sgtv merge`.

The references are written from the papers' equations (Gargiulo et al. CVPR
2025, eq. for TSV-M; Marczak et al. ICML 2025, Iso-C and Iso-CTS), not from
the JAX code: the orthogonalisation is `X (X^T X)^{-1/2}` (an
eigendecomposition, the same polar factor by another route), the projection an
explicit `I - U_c U_c^T`. The task vectors are low rank plus a little noise,
so every kept singular direction is unique (with exactly low-rank inputs the
directions past the rank are arbitrary and the merge is not a function of the
input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from sgtv_jax.merge import get_method, iso_c, iso_cts, tsv
from sgtv_jax.merge.iso import iso_split
from sgtv_jax.merge.plan import TensorPlan, merge_planned
from sgtv_jax.merge.tsv import polar
from tests.helpers import tiny_models as H

RNG = np.random.default_rng(27)


def low_rank(tasks: int, out: int, inn: int, rank: int = 3, noise: float = 1e-2, seed: int = 0) -> np.ndarray:
    """`[T, out, in]` task vectors: rank-`rank` signal of different scales plus small dense noise."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(1.0, 3.0, tasks)[:, None, None]
    sig = np.einsum("tor,tri->toi", rng.standard_normal((tasks, out, rank)), rng.standard_normal((tasks, rank, inn)))
    return scales * sig / np.sqrt(out * inn) + noise * rng.standard_normal((tasks, out, inn)) / np.sqrt(out + inn)


def inv_sqrt_orth(x: np.ndarray) -> np.ndarray:
    """The polar factor of a full-column-rank `x`: `x (x^T x)^{-1/2}` by an eigendecomposition."""
    lam, q = np.linalg.eigh(x.T @ x)
    return x @ (q / np.sqrt(lam)) @ q.T


def weighted(taus: np.ndarray, weights) -> np.ndarray:
    """`w_t tau_t` in float64 (weights None: all 1)."""
    x = np.asarray(taus, np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
    return x * w.reshape((-1,) + (1,) * (x.ndim - 1))


def ref_tsv(taus: np.ndarray, weights=None, alpha: float = 1.0) -> np.ndarray:
    """TSV-M: each task's top r//T triplets, bases orthogonalised, `alpha U_perp S V_perp^T`."""
    x = weighted(taus, weights)
    if x.ndim != 3:
        return alpha * x.mean(0)
    k = min(x.shape[1:]) // len(x)
    us, ss, vs = [], [], []
    for d in x:
        u, s, vt = np.linalg.svd(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    u_perp, v_perp = inv_sqrt_orth(np.hstack(us)), inv_sqrt_orth(np.hstack(vs))
    return alpha * u_perp @ np.diag(np.concatenate(ss)) @ v_perp.T


def ref_iso_c(taus: np.ndarray, weights=None, alpha: float = 1.0) -> np.ndarray:
    """Iso-C: `alpha * mean(s) U V^T` of the weighted sum's SVD."""
    x = weighted(taus, weights)
    if x.ndim != 3:
        return alpha * x.mean(0)
    u, s, vt = np.linalg.svd(x.sum(0), full_matrices=False)
    return alpha * s.mean() * u @ vt


def ref_iso_cts(taus: np.ndarray, weights=None, alpha: float = 1.0, frac: float = 0.8) -> np.ndarray:
    """Iso-CTS as the paper's Algorithm 1 writes it (the split: its code's rounding)."""
    x = weighted(taus, weights)
    if x.ndim != 3:
        return alpha * x.mean(0)
    tasks, out, _ = x.shape
    r = min(x.shape[1:])
    c = r - round((r - int(r * frac)) / tasks) * tasks
    n = (r - c) // tasks
    u, s, vt = np.linalg.svd(x.sum(0), full_matrices=False)
    proj = np.eye(out) - u[:, :c] @ u[:, :c].T
    us, ss, vs = [u[:, :c]], [s[:c]], [vt[:c].T]
    for d in x:
        ut, st, vtt = np.linalg.svd(proj @ d, full_matrices=False)
        us.append(ut[:, :n])
        ss.append(st[:n])
        vs.append(vtt[:n].T)
    u_perp, v_perp = inv_sqrt_orth(np.hstack(us)), inv_sqrt_orth(np.hstack(vs))
    return alpha * np.concatenate(ss).mean() * u_perp @ v_perp.T


SHAPES = [(3, 12, 20), (2, 24, 10), (4, 16, 16), (3, 9, 30)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("fn", "ref", "alpha"), [(tsv, ref_tsv, 1.3), (iso_c, ref_iso_c, 0.7)])
def test_tsv_and_iso_c_match_the_float64_reference(shape, fn, ref, alpha):
    x = low_rank(*shape, seed=shape[1])
    w = np.random.default_rng(shape[2]).uniform(0.5, 1.5, shape[0])
    with jax.enable_x64(True):
        got = np.asarray(fn(x, list(w), alpha=alpha))
    np.testing.assert_allclose(got, ref(x, w, alpha), rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("frac", [0.8, 0.5, 0.0, 1.0])
def test_iso_cts_matches_the_float64_reference(shape, frac):
    x = low_rank(*shape, seed=shape[1])
    w = np.random.default_rng(shape[2]).uniform(0.5, 1.5, shape[0])
    with jax.enable_x64(True):
        got = np.asarray(iso_cts(x, list(w), alpha=1.1, common_space_fraction=frac))
    np.testing.assert_allclose(got, ref_iso_cts(x, w, 1.1, frac), rtol=1e-8, atol=1e-11)


def dense(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Dense Gaussian task vectors `[T, out, in]` in float32: well-separated singular values, as float32 SVDs need
    (the noise-level directions of `low_rank` are too close together for float32 to order them stably)."""
    return (0.1 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def test_float32_inputs_stay_close_to_the_float64_reference():
    x = dense((3, 12, 20), seed=1)
    for fn, ref in ((tsv, ref_tsv), (iso_c, ref_iso_c), (iso_cts, ref_iso_cts)):
        got = fn(x)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got, np.float64), ref(x), rtol=2e-4, atol=2e-6, err_msg=fn.__name__)


# ----------------------------------------------------------------- invariants


def test_tsv_of_one_full_rank_task_is_alpha_times_it():
    x = RNG.standard_normal((1, 7, 11))
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(tsv(x, alpha=0.4)), 0.4 * x[0], rtol=1e-10, atol=1e-12)


def test_tsv_keeps_each_tasks_top_singular_values_on_orthonormal_bases():
    """The orthogonalised bases are orthonormal, so the merge's spectrum is exactly the kept singular values."""
    x = low_rank(3, 12, 20, seed=5)
    with jax.enable_x64(True):
        got = np.asarray(tsv(x, alpha=2.0))
    k = 12 // 3
    kept = np.sort(np.concatenate([np.linalg.svd(d, compute_uv=False)[:k] for d in x]))[::-1]
    s = np.linalg.svd(got, compute_uv=False)
    np.testing.assert_allclose(s[: 3 * k], 2.0 * kept, rtol=1e-10)
    np.testing.assert_allclose(s[3 * k :], 0.0, atol=1e-12)


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (6, 6)])
def test_polar_gives_orthonormal_columns_and_keeps_orthonormal_ones(shape):
    a = RNG.standard_normal(shape)
    with jax.enable_x64(True):
        p = np.asarray(polar(jnp.asarray(a)))
        q = np.linalg.qr(RNG.standard_normal((9, 4)))[0]
        kept = np.asarray(polar(jnp.asarray(q)))
    gram = p.T @ p if shape[0] >= shape[1] else p @ p.T
    np.testing.assert_allclose(gram, np.eye(min(shape)), atol=1e-12)
    np.testing.assert_allclose(kept, q, atol=1e-12)
    if shape[0] >= shape[1]:  # the nearest such matrix: the polar factor by another route
        np.testing.assert_allclose(p, inv_sqrt_orth(a), atol=1e-10)


@pytest.mark.parametrize("fn", [iso_c, iso_cts])
@pytest.mark.parametrize("shape", [(3, 12, 20), (2, 24, 10)])
def test_iso_spectrum_is_flat(fn, shape):
    x = low_rank(*shape, seed=3)
    with jax.enable_x64(True):
        s = np.linalg.svd(np.asarray(fn(x, alpha=1.5)), compute_uv=False)
    assert s.size == min(shape[1:])
    np.testing.assert_allclose(s, s[0], rtol=1e-10)
    if fn is iso_c:
        np.testing.assert_allclose(s[0], 1.5 * np.linalg.svd(x.sum(0), compute_uv=False).mean(), rtol=1e-10)


def test_iso_cts_is_iso_c_for_one_task_or_the_whole_rank_in_common():
    x = low_rank(3, 10, 14, seed=4)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(iso_cts(x[:1])), np.asarray(iso_c(x[:1])), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            np.asarray(iso_cts(x, common_space_fraction=1.0)), np.asarray(iso_c(x)), rtol=1e-9, atol=1e-12
        )
        assert not np.allclose(np.asarray(iso_cts(x)), np.asarray(iso_c(x)), rtol=1e-3)


@pytest.mark.parametrize(
    "rank,tasks,frac,want",
    [
        (768, 8, 0.8, (616, 19)),  # ViT-B/16, 8 tasks: c0 = 614, round(154 / 8) = 19
        (12, 3, 0.8, (9, 1)),  # c0 = 9, round(3 / 3) = 1
        (6, 4, 0.8, (6, 0)),  # c0 = 4, round(0.5) = 0: halves to even, as the reference's Python round
        (10, 2, 0.0, (0, 5)),  # no common subspace: each task its own 5
        (5, 3, 0.0, (2, 1)),  # the reference's round(5 / 3) = 2 would leave c = -1: n capped at r // T
        (7, 2, 1.0, (7, 0)),  # everything common: Iso-C
    ],
)
def test_iso_split(rank, tasks, frac, want):
    c, n = iso_split(rank, tasks, frac)
    assert (c, n) == want and c + tasks * n == rank


@pytest.mark.parametrize("fn", [tsv, iso_c, iso_cts])
def test_tensors_that_are_not_matrices_get_alpha_times_the_weighted_mean(fn):
    v = RNG.standard_normal((3, 8))
    w = [1.0, -0.5, 2.0]
    with jax.enable_x64(True):
        got = np.asarray(fn(v, w, alpha=0.6))
    np.testing.assert_allclose(got, 0.6 * np.einsum("t,ti->i", w, v) / 3, rtol=1e-13)


def test_tsv_keeps_one_component_per_task_where_the_rank_is_below_the_task_count():
    x = low_rank(3, 2, 8, rank=1, seed=8)  # r = 2 < T = 3: the reference would keep none
    got = np.asarray(tsv(x))
    assert np.all(np.isfinite(got)) and np.linalg.norm(got) > 0.1 * np.linalg.norm(x[0])


def test_untouched_tensor_stays_zero():
    z = np.zeros((3, 6, 9), np.float32)
    for fn in (tsv, iso_c, iso_cts):
        np.testing.assert_array_equal(np.asarray(fn(z)), 0.0)


# ----------------------------------------------------------------- errors, jit / vmap, by name


@pytest.mark.parametrize(
    ("fn", "kw", "match"),
    [
        (tsv, {"alpha": -1.0}, "tsv alpha must be >= 0"),
        (iso_c, {"alpha": -0.1}, "iso_c alpha must be >= 0"),
        (iso_cts, {"common_space_fraction": 1.5}, "common_space_fraction must be a number in"),
        (iso_cts, {"common_space_fraction": True}, "common_space_fraction must be a number in"),
    ],
)
def test_bad_settings_name_the_tensor(fn, kw, match):
    with pytest.raises(ValueError, match=f"{match}.*layers.3.q_proj"):
        fn(low_rank(2, 4, 6), name="layers.3.q_proj", **kw)


def test_nan_task_vector_is_refused_naming_the_model():
    bad = low_rank(3, 4, 6)
    bad[2, 1, 1] = np.inf
    for fn in (tsv, iso_c, iso_cts):
        with pytest.raises(ValueError, match=r"NaN or Inf.*model 2"):
            fn(bad, name="w")


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_jit_vmap_and_by_name_agree_with_the_reference(name):
    fn = get_method(name)
    x = jnp.asarray(dense((3, 12, 20), seed=2))
    ref = {"tsv": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}[name]
    jitted = jax.jit(lambda d, a: fn(d, alpha=a))(x, 0.5)
    np.testing.assert_allclose(np.asarray(jitted, np.float64), ref(x, alpha=0.5), rtol=2e-4, atol=2e-6)
    batched = jax.vmap(lambda d: fn(d))(jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(np.asarray(batched[1], np.float64), ref(2 * np.asarray(x)), rtol=2e-4, atol=4e-6)
    # a traced bad alpha is no silent result: the guard turns it into NaN
    assert np.all(np.isnan(np.asarray(jax.jit(lambda d, a: fn(d, alpha=a))(x, -1.0))))


def test_a_traced_common_space_fraction_is_refused():
    x = jnp.asarray(low_rank(2, 4, 6), jnp.float32)
    with pytest.raises(ValueError, match="not traced"):
        jax.jit(lambda d, f: iso_cts(d, common_space_fraction=f))(x, 0.5)


def test_merge_planned_runs_them_by_name_with_the_config_parameters():
    x = low_rank(3, 12, 20, seed=6)
    plan = TensorPlan(
        "iso_cts", "layer.weight", (1.0, 2.0, 0.5), (1.0,) * 3, params={"alpha": 0.9, "common_space_fraction": 0.5}
    )
    with jax.enable_x64(True):
        got, _, info = merge_planned(plan, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref_iso_cts(x, [1.0, 2.0, 0.5], 0.9, 0.5), rtol=1e-8, atol=1e-11)
    assert info.trim is None


# ----------------------------------------------------------------- sgtv merge


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    """A tiny llama base and three fine-tunes (dense perturbations: full-rank task vectors)."""
    return (root := tmp_path_factory.mktemp("tsv_iso")), H.make_family(root, "llama", tasks=3)


@pytest.mark.parametrize(
    "method,params,ref",
    [
        ("tsv", {"alpha": 1.0}, lambda x, w: ref_tsv(x, w, 1.0)),
        ("iso_c", {"alpha": 1.5}, lambda x, w: ref_iso_c(x, w, 1.5)),
        ("iso_cts", {"alpha": 1.2, "common_space_fraction": 0.5}, lambda x, w: ref_iso_cts(x, w, 1.2, 0.5)),
    ],
)
def test_through_sgtv_merge(three_models, method, params, ref):
    """Linear weights as stored (`[out, in]`), the embedding in its `[hidden, vocab]` view, 1-D tensors averaged."""
    root, paths = three_models
    weights = [1.0, 0.5, 0.8]
    models = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths["fts"], weights)]
    cfg = {"merge_method": method, "base_model": str(paths["base"]), "models": models, "parameters": params}
    got = H.merge_yaml(root, method, {**cfg, "dtype": "float32"})
    base = load_file(str(paths["base"] / "model.safetensors"))
    fts = [load_file(str(p / "model.safetensors")) for p in paths["fts"]]
    assert set(got) == set(base)
    for k, b in base.items():
        taus = np.stack([f[k] - b for f in fts])
        emb = k == "model.embed_tokens.weight"
        want = ref(taus.transpose(0, 2, 1) if emb else taus, weights)
        want = b.astype(np.float64) + (want.T if emb else want)
        np.testing.assert_allclose(got[k], want, rtol=2e-4, atol=2e-6, err_msg=k)
