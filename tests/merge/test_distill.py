"""AdaMerging's distillation objective (sgtv_jax.merge.distill) against float64 oracles and invariants."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgtv_jax.merge import adamerging as ada
from sgtv_jax.merge import distill
from sgtv_jax.models import build_model
from tests.helpers import tiny_models as H

VOCAB = 64


def _logsoftmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl_np(merged: np.ndarray, teacher: np.ndarray, mask: np.ndarray) -> float:
    lp, lq = _logsoftmax(teacher), _logsoftmax(merged)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return float((kl * mask).sum() / mask.sum())


def _coarse_kl_np(merged: np.ndarray, teacher: np.ndarray, mask: np.ndarray, k: int) -> float:
    """KL of the two distributions coarsened to the teacher's k most likely tokens plus one bin for the rest."""
    p, q = np.exp(_logsoftmax(teacher)), np.exp(_logsoftmax(merged))
    out = np.zeros(mask.shape)
    for i in np.ndindex(mask.shape):
        top = np.argsort(-p[i], kind="stable")[:k]
        rest = np.setdiff1d(np.arange(p.shape[-1]), top)
        pk, qk = p[i][top], q[i][top]
        out[i] = (pk * np.log(pk / qk)).sum()
        if rest.size:
            pr, qr = p[i][rest].sum(), q[i][rest].sum()
            out[i] += pr * np.log(pr / qr)
    return float((out * mask).sum() / mask.sum())


def test_distill_loss_hand_computed_and_float64_oracle():
    # by hand: p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    merged = jnp.asarray([[[math.log(3.0), 0.0]]])
    got = float(distill.distill_loss(merged, jnp.zeros((1, 1, 2)), jnp.ones((1, 1))))
    assert got == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    rng = np.random.default_rng(0)
    m = (rng.standard_normal((3, 5, 11)) * 3).astype(np.float32)
    t = (rng.standard_normal((3, 5, 11)) * 3).astype(np.float32)
    mask = (rng.random((3, 5)) > 0.3).astype(np.int32)
    got = float(distill.distill_loss(jnp.asarray(m), jnp.asarray(t), jnp.asarray(mask)))
    assert got == pytest.approx(_kl_np(m, t, mask), rel=1e-5)
    # KL(p || p) = 0; only masked positions count; no mask entries: 0
    assert float(distill.distill_loss(jnp.asarray(t), jnp.asarray(t), jnp.asarray(mask))) == pytest.approx(0, abs=1e-6)
    assert float(distill.distill_loss(jnp.asarray(m), jnp.asarray(t), jnp.zeros((3, 5)))) == 0.0
    # a teacher's -inf logit (p = 0) adds 0, not NaN, to the value and the gradient
    t[..., 0] = -np.inf
    got = distill.distill_loss(jnp.asarray(m), jnp.asarray(t), jnp.asarray(mask))
    assert float(got) == pytest.approx(_kl_np(m, np.where(np.isinf(t), -1e30, t), mask), rel=1e-5)
    g = jax.grad(lambda z: distill.distill_loss(z, jnp.asarray(t), jnp.asarray(mask)))(jnp.asarray(m))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("k", [1, 4, 11, 50])
def test_topk_loss_is_the_coarsened_kl(k):
    rng = np.random.default_rng(k)
    m = (rng.standard_normal((2, 4, 11)) * 2).astype(np.float32)
    t = (rng.standard_normal((2, 4, 11)) * 2).astype(np.float32)
    mask = np.ones((2, 4), np.int32)
    mask[1, 3] = 0
    teacher = distill.teacher_topk(jnp.asarray(t), k)
    assert teacher.logp.shape == (2, 4, min(k, 11))
    got = float(distill.distill_loss_topk(jnp.asarray(m), teacher, jnp.asarray(mask)))
    assert got == pytest.approx(_coarse_kl_np(m, t, mask, k), rel=1e-5, abs=1e-7)
    full = _kl_np(m, t, mask)
    if k >= 11:  # every token kept: the full KL
        assert got == pytest.approx(full, rel=1e-5)
    else:  # coarsening never raises a KL
        assert got <= full + 1e-6
    g = jax.grad(lambda z: distill.distill_loss_topk(z, teacher, jnp.asarray(mask)))(jnp.asarray(m))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.fixture(scope="module")
def tiny():
    """A 2-block LLaMA base, two specialists (other random inits, half way) and each task's own windows."""
    cfg = H.flax_llama_config(VOCAB, 2)
    base = build_model(cfg, nnx.Rngs(0))
    b = nnx.state(base)
    fts = []
    for s in (1, 2):
        m = build_model(cfg, nnx.Rngs(0))
        other = nnx.state(build_model(cfg, nnx.Rngs(s)))
        nnx.update(m, jax.tree.map(lambda x, o: x + 0.5 * (o - x), b, other))
        fts.append(m)
    rng = np.random.default_rng(0)
    # task 0: low token ids, 4 windows of 10; task 1: high ids, 6 windows of 8 (other shapes: padded)
    w0 = rng.integers(0, VOCAB // 2, (4, 10)).astype(np.int32)
    w1 = rng.integers(VOCAB // 2, VOCAB, (6, 8)).astype(np.int32)
    windows = [(w0, np.ones_like(w0)), (w1, np.ones_like(w1))]
    return base, fts, windows


def _kl_to_specialists(merged, fts, windows) -> float:
    """sum_t KL(specialist t || merged) on task t's windows, full vocabulary, float64 (the oracle's)."""
    total = 0.0
    for ft, (ids, mask) in zip(fts, windows, strict=True):
        p = np.asarray(ft(jnp.asarray(ids), jnp.asarray(mask)))
        q = np.asarray(merged(jnp.asarray(ids), jnp.asarray(mask)))
        total += _kl_np(q, p, mask)
    return total


def test_distill_learning_lowers_the_kl_to_the_specialists(tiny):
    base, fts, windows = tiny
    graphdef, bstate = nnx.split(base)
    taus = ada.stack_task_vectors(bstate, [nnx.state(m) for m in fts])
    groups = ada.param_groups(bstate)
    # the cached top-k batches: a specialist's own coefficients (one-hot) give its task a zero KL
    batches = distill.distill_batches(graphdef, [nnx.state(m) for m in fts], windows, 4, topk=VOCAB)
    assert batches["input_ids"].shape == (2, 2, 4, 10) and batches["teacher"].logp.shape == (2, 2, 4, 10, VOCAB)
    one_hot = jnp.tile(jnp.asarray([[1.0, 0.0]]), (3, 1))
    batch0 = jax.tree.map(lambda x: x[0, :1], batches)  # task 0 only
    assert float(distill.DistillLoss(graphdef)(one_hot, bstate, taus, batch0)) < 1e-4

    start = nnx.merge(graphdef, ada.layerwise_merge(bstate, taus, jnp.full((3, 2), 0.3), groups))
    before = _kl_to_specialists(start, fts, windows)
    merged, coeffs, losses = distill.merge_with_distilled_coefficients(
        base, fts, windows, batch_size=8, topk=16, steps=12, learning_rate=0.1, seed=0
    )
    after = _kl_to_specialists(merged, fts, windows)
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0]
    assert after < 0.9 * before, (before, after)  # the full KL, measured independently, fell too
    c = np.asarray(coeffs)
    assert c.shape == (3, 2) and np.all((c >= 0) & (c <= 1)) and not np.allclose(c, 0.3)
