"""Learned merge coefficients (sgtv_jax.merge.adamerging) against float64 oracles and invariants."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgtv_jax.merge import adamerging as ada
from sgtv_jax.models import build_model
from tests.helpers import tiny_models as H

VOCAB = 64
BLOCKS = 2
G = BLOCKS + 1  # one group per block and one for the rest
STEPS = 12  # one compiled program for every test that learns


def _entropy_np(logits: np.ndarray, mask: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    h = -(np.exp(logp) * logp).sum(-1)
    return float((h * mask).sum() / mask.sum())


def test_entropy_matches_float64_numpy():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 5, 11)) * 4).astype(np.float32)
    mask = (rng.random((3, 5)) > 0.3).astype(np.int32)
    got = float(ada.entropy(jnp.asarray(logits), jnp.asarray(mask)))
    assert got == pytest.approx(_entropy_np(logits, mask), rel=1e-6)
    # huge logits: log-softmax stays finite; a -inf logit adds 0 (not NaN), as a dropped class
    big = logits * 1e4
    assert float(ada.entropy(jnp.asarray(big), jnp.asarray(mask))) == pytest.approx(
        _entropy_np(big, mask), rel=1e-5, abs=1e-6
    )
    ninf = logits.copy()
    ninf[..., 0] = -np.inf
    got = ada.entropy(jnp.asarray(ninf), jnp.asarray(mask))
    assert float(got) == pytest.approx(_entropy_np(logits[..., 1:], mask), rel=1e-6)
    g = jax.grad(lambda z: ada.entropy(z, jnp.asarray(mask)))(jnp.asarray(ninf))
    assert np.all(np.isfinite(np.asarray(g)))
    # uniform predictions: log V; no real position: 0
    assert float(ada.entropy(jnp.zeros((2, 3, 7)), jnp.ones((2, 3)))) == pytest.approx(np.log(7), rel=1e-6)
    assert float(ada.entropy(jnp.asarray(logits), jnp.zeros((3, 5)))) == 0.0


def test_layerwise_merge_matches_numpy():
    rng = np.random.default_rng(1)
    t = 3
    base = {"a": rng.standard_normal((4, 5)), "b": {"c": rng.standard_normal(6), "d": rng.standard_normal((2, 2, 2))}}
    taus = jax.tree.map(lambda x: rng.standard_normal((t,) + x.shape), base)
    groups = {"a": 2, "b": {"c": 0, "d": 2}}
    coeffs = rng.standard_normal((3, t))
    f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (base, taus))
    got = ada.layerwise_merge(*f32, jnp.asarray(coeffs, jnp.float32), groups)
    for path, b in [(("a",), base["a"]), (("b", "c"), base["b"]["c"]), (("b", "d"), base["b"]["d"])]:
        tau, g, out = taus, groups, got
        for k in path:
            tau, g, out = tau[k], g[k], out[k]
        want = b + np.einsum("t,t...->...", coeffs[g], tau)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    # the base dtype is kept (bfloat16 weights stay bfloat16)
    bf = ada.layerwise_merge({"a": jnp.ones(3, jnp.bfloat16)}, {"a": jnp.ones((t, 3))}, jnp.ones((1, t)), {"a": 0})
    assert bf["a"].dtype == jnp.bfloat16 and float(bf["a"][0]) == 1.0 + t


@pytest.fixture(scope="module")
def tiny():
    """A 2-block LLaMA base, two task vectors (other random inits, half way) and calibration batches."""
    cfg = H.flax_llama_config(VOCAB, BLOCKS)
    base_model = build_model(cfg, nnx.Rngs(0))
    graphdef, base = nnx.split(base_model)
    fts = [nnx.state(build_model(cfg, nnx.Rngs(s))) for s in (1, 2)]
    taus = ada.stack_task_vectors(base, [jax.tree.map(lambda b, f: b + 0.5 * (f - b), base, ft) for ft in fts])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (6, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # a padded window
    batches = ada.calibration_batches(ids, mask, 2)
    return graphdef, base, taus, batches


def test_groups_are_blocks_plus_outer(tiny):
    _, base, _, _ = tiny
    groups = jax.tree_util.tree_leaves_with_path(ada.param_groups(base))
    assert ada.num_blocks(base) == BLOCKS
    for path, g in groups:
        first = path[0].key
        assert g == (int(path[1].key) if first == "blocks" else BLOCKS), path


def _batch(batches, i):
    return jax.tree.map(lambda x: x[i], batches)


# compiled once per loss (EntropyLoss is hashable) and shared by the tests
@functools.partial(jax.jit, static_argnums=0)
def _loss(loss, coeffs, base, taus, batch):
    return loss(coeffs, base, taus, batch)


@functools.partial(jax.jit, static_argnums=0)
def _grad(loss, coeffs, base, taus, batch):
    return jax.grad(loss)(coeffs, base, taus, batch)


def test_coefficient_gradient_matches_chain_rule_and_finite_differences(tiny):
    graphdef, base, taus, batches = tiny
    batch = _batch(batches, 0)
    coeffs = jnp.asarray(np.random.default_rng(3).uniform(0.1, 0.6, (G, 2)), jnp.float32)
    loss = ada.entropy_loss(graphdef, remat=True)
    got = np.asarray(_grad(loss, coeffs, base, taus, batch), np.float64)

    # Oracle 1 (chain rule): dL/dlambda[g,t] = sum over the leaves p of group g of <dL/dtheta_p, tau_t[p]>,
    # dL/dtheta from the plain model call (no layer-wise merge, no remat), contracted in float64.
    groups = ada.param_groups(base)
    merged = ada.layerwise_merge(base, taus, coeffs, groups)

    def plain(state):
        return ada.entropy(nnx.merge(graphdef, state)(batch["input_ids"], batch["mask"]), batch["mask"])

    dtheta = jax.jit(jax.grad(plain))(merged)
    want = np.zeros((G, 2))
    for d, tau, g in zip(jax.tree.leaves(dtheta), jax.tree.leaves(taus), jax.tree.leaves(groups)):
        d64, tau64 = np.asarray(d, np.float64), np.asarray(tau, np.float64)
        want[g] += (tau64 * d64[None]).reshape(len(tau64), -1).sum(1)
    scale = np.abs(want).max()
    assert scale > 1e-3  # a gradient worth checking
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)

    # Oracle 2: Richardson-extrapolated central differences (float64 arithmetic on float32 losses).
    # The float32 rounding of L (~1e-6 absolute) over the step dominates: the error falls as 1/h
    # (measured: 2% of the gradient's scale at h = 0.02, 0.2% at h = 0.2), so steps of 0.2 and 0.1,
    # whose O(h^4) truncation is far smaller on this smooth loss.
    def central(g: int, t: int, h: float) -> float:
        e = jnp.zeros((G, 2)).at[g, t].set(h)
        hi, lo = _loss(loss, coeffs + e, base, taus, batch), _loss(loss, coeffs - e, base, taus, batch)
        return (float(hi) - float(lo)) / (2 * h)

    fd = np.array([[(4 * central(g, t, 0.1) - central(g, t, 0.2)) / 3 for t in range(2)] for g in range(G)])
    np.testing.assert_allclose(got, fd, rtol=0, atol=1e-2 * scale)


def test_remat_gives_the_same_gradient(tiny):
    graphdef, base, taus, batches = tiny
    batch = _batch(batches, 1)
    coeffs = jnp.asarray(np.random.default_rng(4).uniform(0.0, 1.0, (G, 2)), jnp.float32)
    g_remat = _grad(ada.entropy_loss(graphdef, remat=True), coeffs, base, taus, batch)
    g_plain = _grad(ada.entropy_loss(graphdef, remat=False), coeffs, base, taus, batch)
    scale = float(jnp.abs(g_plain).max())
    np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g_plain), rtol=0, atol=1e-5 * scale)

    # and remat is really there: one checkpointed call per block, plus the head
    def remats(remat: bool) -> int:
        jaxpr = jax.make_jaxpr(ada.entropy_loss(graphdef, remat=remat))(coeffs, base, taus, batch)
        return sum(e.primitive is checkpoint for e in jaxpr.jaxpr.eqns)

    checkpoint = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).jaxpr.eqns[0].primitive

    assert (remats(True), remats(False)) == (BLOCKS + 1, 0)


def _learn(tiny, seed: int, steps: int = STEPS):
    graphdef, base, taus, batches = tiny
    return ada.learn_coefficients(
        ada.entropy_loss(graphdef),
        base,
        taus,
        batches,
        num_groups=G,
        steps=steps,
        learning_rate=0.05,
        init=0.3,
        seed=seed,
    )


def test_deterministic_given_the_seed(tiny):
    c1, l1 = _learn(tiny, seed=7)
    c2, l2 = _learn(tiny, seed=7)
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
    _, l3 = _learn(tiny, seed=8)  # another batch order: other losses along the way
    assert not np.array_equal(np.asarray(l1), np.asarray(l3))


def test_learned_coefficients_lower_the_entropy(tiny):
    graphdef, base, taus, batches = tiny
    coeffs, losses = _learn(tiny, seed=0)
    assert coeffs.shape == (G, 2) and losses.shape == (STEPS,)
    assert np.all((np.asarray(coeffs) >= 0) & (np.asarray(coeffs) <= 1))  # the projection's range
    loss = ada.entropy_loss(graphdef)

    def total(c):  # over all calibration batches
        return np.mean([float(_loss(loss, c, base, taus, _batch(batches, i))) for i in range(3)])

    start = total(jnp.full((G, 2), 0.3))
    assert total(coeffs) < start - 1e-4


def test_learn_coefficients_finds_a_known_optimum_inside_a_callers_jit():
    """A least-squares loss whose unique minimiser is known: Adam under scan reaches it, jitted or not."""
    rng = np.random.default_rng(5)
    base = {
        "a": jnp.asarray(rng.standard_normal(5), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
    }
    taus = {k: jnp.asarray(rng.standard_normal((2,) + v.shape), jnp.float32) for k, v in base.items()}
    groups = {"a": 0, "b": 1}
    best = jnp.asarray([[0.2, 0.7], [0.9, 0.4]], jnp.float32)
    target = ada.layerwise_merge(base, taus, best, groups)

    def loss(coeffs, base, taus, batch):
        merged = ada.layerwise_merge(base, taus, coeffs, groups)
        return sum(jnp.sum((merged[k] - target[k]) ** 2) for k in merged) * batch

    batches = jnp.ones((3,))
    kw = dict(num_groups=2, steps=400, learning_rate=0.02, seed=1)
    c, losses = ada.learn_coefficients(loss, base, taus, batches, **kw)
    np.testing.assert_allclose(np.asarray(c), np.asarray(best), atol=1e-2)
    assert float(losses[-1]) < 1e-3 * float(losses[0])
    c_jit, _ = jax.jit(lambda b, t, x: ada.learn_coefficients(loss, b, t, x, **kw))(base, taus, batches)
    np.testing.assert_allclose(np.asarray(c_jit), np.asarray(c), rtol=1e-6, atol=1e-7)
    # the projection holds coefficients in [lo, hi] even when the optimum lies outside
    c_clip, _ = ada.learn_coefficients(loss, base, taus, batches, **{**kw, "steps": 50}, clip=(0.0, 0.5))
    assert float(c_clip.min()) >= 0.0 and float(c_clip.max()) <= 0.5
