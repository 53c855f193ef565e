"""Methods mergekit added after 0.1.5: RAM and RAM+ tensor-local (`mergekit/merge_methods/ram.py`).

Each against a float64 NumPy reference written from mergekit's source (its
masks, counts and clamps, step by step), hand-worked cases, the same call
under `jax.jit` with traced parameters, and `sgtv merge` on a tiny model.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from sgtv_jax.cli import main
from sgtv_jax.merge.ram import ram, ramplus_tl
from sgtv_jax.merge.specs import MERGEKIT_REGISTRY, METHOD_SPECS, REFUSED
from sgtv_jax.pipeline.config import ConfigError, parse_config
from tests.helpers import tiny_models as H

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
        np.asarray(ram(x, threshold=epsilon), np.float64), ref_ram(x, epsilon), rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("r,alpha,epsilon", [(0.1, 0.2, 1e-5), (0.5, 3.0, 0.01), (1.0, 0.0, 1e-5)])
def test_ramplus_tl_reference(r, alpha, epsilon):
    x = _taus()
    want = ref_ram(x, epsilon, plus=True, r=r, alpha=alpha)
    got = np.asarray(ramplus_tl(x, r=r, alpha=alpha, threshold=epsilon), np.float64)
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
        ram(x, threshold=-1.0)


def test_ram_under_jit_with_traced_parameters():
    x = _taus()
    f = jax.jit(lambda d, e: ram(d, threshold=e))
    np.testing.assert_allclose(np.asarray(f(x, 0.02), np.float64), ref_ram(x, 0.02), rtol=1e-6, atol=1e-9)
    g = jax.jit(lambda d, r, a, e: ramplus_tl(d, r=r, alpha=a, threshold=e))
    want = ref_ram(x, 0.01, plus=True, r=0.5, alpha=3.0)
    np.testing.assert_allclose(np.asarray(g(x, 0.5, 3.0, 0.01), np.float64), want, rtol=1e-6, atol=1e-9)
    batched = jax.vmap(lambda e: ram(x, threshold=e))(np.array([1e-5, 0.02], np.float32))
    np.testing.assert_allclose(np.asarray(batched[1], np.float64), ref_ram(x, 0.02), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------- sgtv merge / sgtv methods


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("ram")
    return root, H.make_family(root, "llama", tasks=2)


@pytest.mark.parametrize(
    "method,params,kw",
    [
        ("ram", {"epsilon": 0.01}, {"epsilon": 0.01}),
        (
            "ramplus_tl",
            {"epsilon": 0.01, "r": 0.5, "alpha": 3.0},
            {"epsilon": 0.01, "plus": True, "r": 0.5, "alpha": 3.0},
        ),
    ],
)
def test_ram_through_sgtv_merge(family, method, params, kw):
    root, paths = family
    cfg = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [{"model": str(p)} for p in paths["fts"]],
        "parameters": params,
        "dtype": "float32",
    }
    (root / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(root / f"{method}.yaml"), str(root / method), "--quiet"]) == 0
    got = load_file(str(root / method / "model.safetensors"))
    base = load_file(str(paths["base"] / "model.safetensors"))
    fts = [load_file(str(p / "model.safetensors")) for p in paths["fts"]]
    for k, b in base.items():
        taus = np.stack([f[k].astype(np.float32) - b for f in fts])  # mergekit subtracts in the tensors' dtype
        want = b.astype(np.float64) + ref_ram(taus, **kw)
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7, err_msg=k)


def test_ram_epsilon_is_its_own_parameter():
    from sgtv_jax.pipeline.config import method_kwargs

    cfg = {"merge_method": "ram", "base_model": ".", "models": ["./x"], "parameters": {"epsilon": 0.9}}
    parsed = parse_config(cfg)  # 0.9 is a fine RAM threshold (DELLA's per-model epsilon stops at 0.5)
    assert method_kwargs(parsed, "w", None, 1) == {"threshold": 0.9}
    with pytest.raises(ConfigError, match="epsilon"):
        parse_config({**cfg, "parameters": {"epsilon": -1.0}})


def test_sgtv_methods_lists_every_mergekit_method(capsys):
    assert set(MERGEKIT_REGISTRY) <= set(METHOD_SPECS)
    assert not set(REFUSED) & set(METHOD_SPECS)
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in (*MERGEKIT_REGISTRY, *REFUSED):
        assert f"{name}:" in out or f"{name} (" in out, name
    assert f"mergekit's registry ({len(MERGEKIT_REGISTRY)} methods): every method implemented" in out
    with pytest.raises(ConfigError, match="merge_method 'cabs' is not supported: not in mergekit's registry"):
        parse_config({"merge_method": "cabs", "base_model": ".", "models": ["./x"]})


# ----------------------------------------------------------------- pcb (mergekit's unmerged 'pcb' branch)


def ref_pcb(taus, density, weight=1.0):
    """The branch's PCBMergeTask.execute in float64 (ties at the cut broken by the lower index)."""
    tv = np.asarray(taus, np.float64).reshape(len(taus), -1)
    n, big_n = tv.shape
    b = _ref_scores(tv)
    k = int(big_n * density)
    m = np.zeros_like(b)
    for i in range(n):
        m[i, np.argsort(-b[i], kind="stable")[:k]] = 1
    bh = b * m
    return weight * (tv * bh / bh.sum()).sum(0).reshape(np.shape(taus)[1:])


def _pcb_data(seed: int) -> np.ndarray:
    """Continuous task vectors (no repeated values: no near-ties of the scores at the cut), order-independent."""
    return (0.05 * np.random.default_rng(seed).standard_normal((3, 6, 10))).astype(np.float32)


def _cut_gap(taus, density) -> float:
    """Smallest relative gap between the last kept and the first dropped score of any task (float64)."""
    tv = np.asarray(taus, np.float64).reshape(len(taus), -1)
    k = int(tv.shape[1] * density)
    if k in (0, tv.shape[1]):
        return np.inf
    gaps = []
    scores = _ref_scores(tv)
    for i in range(len(tv)):
        s = np.sort(scores[i])[::-1]
        gaps.append((s[k - 1] - s[k]) / s[k - 1])
    return min(gaps)


def _ref_scores(tv):
    """The branch's balancing scores b `[n, N]` of flattened task vectors, in float64."""
    n = len(tv)

    def normalize(x):
        return x / max(np.linalg.norm(x), 1e-12)

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    intra = np.stack([softmax(n * normalize(tv[i] * tv[i])) for i in range(n)])
    inter = np.stack([sum(softmax(normalize(tv[i] * tv[j])) for j in range(n)) for i in range(n)])
    return intra * inter


@pytest.mark.parametrize("density,weight,seed", [(0.3, 1.0, 1), (0.8, 2.5, 2), (1.0, 1.0, 3)])
def test_pcb_reference(density, weight, seed):
    from sgtv_jax.merge.pcb import pcb

    x = _pcb_data(seed)
    assert _cut_gap(x, density) > 1e-4  # the cut is no near-tie: float32 and float64 keep the same entries
    got = np.asarray(pcb(x, weight, density=density), np.float64)
    np.testing.assert_allclose(got, ref_pcb(x, density, weight), rtol=2e-5, atol=1e-12)


def test_pcb_by_hand_and_edges():
    from sgtv_jax.merge.pcb import pcb

    # one task, density 1: b_hat / sum(b_hat) are softmax-like weights summing to 1 over the entries
    tau = np.array([[1.0, 0.0]], np.float32)
    b = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()  # intra: softmax(1 * [1, 0]); inter: the same
    w = b * b / (b * b).sum()
    np.testing.assert_allclose(np.asarray(pcb(tau, density=1.0)), [w[0], 0.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(pcb(tau, density=0.0)), [0.0, 0.0])  # the branch: NaN
    with pytest.raises(ValueError, match="density must be in"):
        pcb(tau, density=1.5)


def test_pcb_under_jit():
    from sgtv_jax.merge.pcb import pcb

    x = _pcb_data(4)
    assert _cut_gap(x, 0.5) > 1e-4
    f = jax.jit(lambda d, w: pcb(d, w, density=0.5))
    np.testing.assert_allclose(np.asarray(f(x, 2.0), np.float64), ref_pcb(x, 0.5, 2.0), rtol=2e-5, atol=1e-12)


# ----------------------------------------------------------------- core_space (mergekit's unmerged pull request)


def ref_core_space(taus, weight=1.0):
    """The pull request's CoreSpaceTask in float64 (SVD fallback to the mean for 1-D tensors)."""
    x = np.asarray(taus, np.float64)
    if x.ndim != 3:
        return weight * x.mean(0)
    r = max(1, min(16, min(x.shape[1:]) // 4))
    bs, as_ = [], []
    for d in x:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        bs.append(u[:, :r])
        as_.append(np.diag(s[:r]) @ vt[:r])
    u_b = np.linalg.svd(np.concatenate(bs, 1), full_matrices=False)[0]
    v_a = np.linalg.svd(np.concatenate(as_, 0), full_matrices=False)[2].T
    c = min(u_b.shape[1], v_a.shape[1])
    u_b, v_a = u_b[:, :c], v_a[:, :c]
    core = sum(u_b.T @ b @ a @ v_a for b, a in zip(bs, as_)) / len(bs)
    return u_b @ (weight * core) @ v_a.T


@pytest.mark.parametrize("shape,weight", [((3, 12, 20), 1.0), ((2, 40, 8), 0.5), ((4, 16), 2.0), ((3, 64, 64), 1.0)])
def test_core_space_reference(shape, weight):
    from sgtv_jax.merge.core_space import core_space

    x = (0.1 * RNG.standard_normal(shape)).astype(np.float32)
    got = np.asarray(core_space(x, [weight] * shape[0]), np.float64)
    np.testing.assert_allclose(got, ref_core_space(x, weight), rtol=2e-4, atol=2e-6)


def test_core_space_is_the_mean_of_the_truncated_svds_when_the_bases_span_them():
    from sgtv_jax.merge.core_space import core_space

    # rank-2 task vectors of a [12, 20] tensor (r = 3): the truncation keeps them whole, the projections
    # onto the reference bases keep them too, so the merge is their plain mean
    x = np.stack([RNG.standard_normal((12, 2)) @ RNG.standard_normal((2, 20)) for _ in range(3)]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(core_space(x), np.float64), x.astype(np.float64).mean(0), atol=2e-5)
    with pytest.raises(ValueError, match="one global weight"):
        core_space(x, [1.0, 2.0, 1.0])


def test_core_space_under_jit():
    from sgtv_jax.merge.core_space import core_space

    x = (0.1 * RNG.standard_normal((3, 12, 20))).astype(np.float32)
    got = jax.jit(lambda d, w: core_space(d, w))(x, np.full(3, 0.5, np.float32))
    np.testing.assert_allclose(np.asarray(got, np.float64), ref_core_space(x, 0.5), rtol=2e-4, atol=2e-6)


def test_core_space_through_sgtv_merge(family):
    root, paths = family
    cfg = {
        "merge_method": "core_space",
        "base_model": str(paths["base"]),
        "models": [{"model": str(p)} for p in paths["fts"]],
        "parameters": {"weight": 0.5},  # the pull request's global weight: every model's here
        "dtype": "float32",
    }
    (root / "core.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(root / "core.yaml"), str(root / "core"), "--quiet"]) == 0
    got = load_file(str(root / "core" / "model.safetensors"))
    base = load_file(str(paths["base"] / "model.safetensors"))
    fts = [load_file(str(p / "model.safetensors")) for p in paths["fts"]]
    for k, b in base.items():
        want = b.astype(np.float64) + ref_core_space(np.stack([f[k] - b for f in fts]), 0.5)
        np.testing.assert_allclose(got[k], want, rtol=2e-4, atol=2e-6, err_msg=k)


# ----------------------------------------------------------------- cabs (mergekit's unmerged pull request)


def ref_cabs(taus, weights, ns, ms):
    """The pull request's CABSTask.execute in float64 (block ties broken by the lower index)."""
    x = np.asarray(taus, np.float64)
    out = np.zeros(x.shape[1:])
    taken = np.zeros(x.shape[1:], bool)
    for t in range(len(x)):
        cand = x[t] * ~taken
        flat = cand.ravel()
        n, m = ns[t], ms[t]
        if n == 0:
            keep = np.zeros(flat.size, bool)
        elif n == m:
            keep = np.ones(flat.size, bool)
        else:
            pad = (m - flat.size % m) % m
            blocks = np.abs(np.concatenate([flat, np.zeros(pad)])).reshape(-1, m)
            kb = np.zeros(blocks.shape, bool)
            for i, row in enumerate(blocks):
                kb[i, np.argsort(-row, kind="stable")[:n]] = True
            keep = kb.ravel()[: flat.size]
        keep = keep.reshape(cand.shape)
        out += weights[t] * cand * keep
        taken |= keep
    return out


@pytest.mark.parametrize(
    "shape,ns,ms,w",
    [
        ((3, 6, 10), [1, 1, 1], [4, 4, 4], [1.0, 1.0, 1.0]),
        ((2, 7, 5), [2, 3], [4, 8], [0.5, 2.0]),
        ((3, 9), [0, 2, 4], [4, 4, 4], [1, 1, 1]),
    ],
)
def test_cabs_reference(shape, ns, ms, w):
    from sgtv_jax.merge.cabs import cabs

    x = _taus(shape, density=0.9)
    got = np.asarray(cabs(x, w, n=ns, m=ms), np.float64)
    np.testing.assert_allclose(got, ref_cabs(x, w, ns, ms), rtol=1e-6, atol=1e-9)


def test_cabs_by_hand():
    from sgtv_jax.merge.cabs import cabs

    tau = np.array([[4.0, -3.0, 2.0, 1.0], [5.0, 1.0, -6.0, 0.5]], np.float32)
    # 2:4: model 0 keeps 4, -3; model 1 sees [0, 0, -6, 0.5] and keeps -6, 0.5
    np.testing.assert_array_equal(np.asarray(cabs(tau, n=2, m=4)), [4.0, -3.0, -6.0, 0.5])
    # 1:2 with weights: model 0 keeps 4 (block 0) and 2 (block 1); model 1 sees [0, 1, 0, 0.5]
    np.testing.assert_allclose(np.asarray(cabs(tau, [1.0, 2.0], n=1, m=2)), [4.0, 2.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="0 <= n <= m"):
        cabs(tau, n=5, m=4)


def test_cabs_under_jit():
    from sgtv_jax.merge.cabs import cabs

    x = _taus((3, 6, 10), density=0.9)
    got = jax.jit(lambda d, w: cabs(d, w, n=2, m=4))(x, np.array([1.0, 0.5, 2.0], np.float32))
    want = ref_cabs(x, [1.0, 0.5, 2.0], [2] * 3, [4] * 3)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-9)
