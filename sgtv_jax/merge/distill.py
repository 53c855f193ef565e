"""AdaMerging's distillation objective: each task's KL to its own specialist on its own text.

The coefficients (`adamerging.learn_coefficients`, layer-wise, Adam) minimise

    sum_t  mean over task t's calibration positions of  KL(p_t || q)

where `p_t` is fine-tune `t`'s next-token distribution on task `t`'s own
calibration windows (the teacher) and `q` the merged model's on the same
windows. Unlike entropy, the objective has a target: it is 0 only where the
merged model predicts like each specialist on that specialist's text, and
scaling task vectors up does not lower it.

Teacher cache (decided here): the specialists' logits are computed once,
before learning, and kept as the `k = min(topk, V)` largest log-probabilities
per position, their token ids and the log of the remaining mass
(`DISTILL_TOPK` = 256 by default). The loss is then the KL between the two
distributions coarsened to those `k` tokens plus one "rest" bin: exact when
`k = V`, a lower bound on the full KL otherwise (coarsening never raises a
KL), and it still sees every token of the merged model through the rest bin.
Full logits would cost `4 T N S V` bytes (3 tasks x 32 windows x 128 tokens
x a 151k vocabulary: 7.4 GB); top-256 costs `12 T N S k` (38 MB).

* `distill_loss(merged [B,S,V], teacher [B,S,V], mask [B,S])`: the full KL, pure.
* `teacher_topk(logits [..., V], k)` -> `Teacher` (`logp`, `idx` `[..., k]`, `lrest` `[...]`).
* `distill_loss_topk(merged [B,S,V], teacher, mask [B,S])`: the coarsened KL.
* `distill_batches(graphdef, specialists, windows, batch_size, topk)`: each task's
  windows and its teacher, as `learn_coefficients` batches `[N, T, b, S, ...]`.
* `DistillLoss` and `merge_with_distilled_coefficients`: the Flax learning pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgtv_jax.defaults import DISTILL_TOPK
from sgtv_jax.merge import adamerging as ada


class Teacher(NamedTuple):
    """A specialist's next-token distributions, top-k: `logp` / `idx` `[..., k]`, `lrest` `[...]` (log rest mass)."""

    logp: jax.Array
    idx: jax.Array
    lrest: jax.Array


def _masked_mean(per_position: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(per_position.dtype)
    return jnp.sum(per_position * m) / jnp.maximum(jnp.sum(m), 1.0)


def _xlogy_ratio(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """`p (log p - log q)` elementwise, 0 where `p = 0` (a `-inf` log-probability), without NaN in values or gradients."""
    live = jnp.isfinite(logp)
    lp = jnp.where(live, logp, 0.0)
    lq = jnp.where(live, logq, 0.0)
    return jnp.where(live, jnp.exp(lp) * (lp - lq), 0.0)


def distill_loss(merged_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean `KL(softmax(teacher) || softmax(merged))` over positions with `mask != 0`; scalar.

    merged_logits, teacher_logits `[B, S, V]` (computed in at least float32), mask `[B, S]`.
    No mask entries: 0.
    """
    dt = ada.work_dtype(merged_logits.dtype)
    logq = jax.nn.log_softmax(merged_logits.astype(dt), axis=-1)
    logp = jax.nn.log_softmax(teacher_logits.astype(dt), axis=-1)
    return _masked_mean(jnp.sum(_xlogy_ratio(logp, logq), axis=-1), mask)


def teacher_topk(logits: jax.Array, k: int) -> Teacher:
    """The `k` largest log-probabilities of `softmax(logits)` `[..., V]`, their ids, and the log of the rest's mass.

    `k >= V` keeps every token (`lrest = -inf`: no rest).
    """
    logp = jax.nn.log_softmax(logits.astype(ada.work_dtype(logits.dtype)), axis=-1)
    top, idx = jax.lax.top_k(logp, min(k, logp.shape[-1]))
    # the rest's log-mass from the tokens outside the top k (not 1 - sum: that cancels to noise)
    outside = jnp.ones(logp.shape, bool)
    outside = jnp.put_along_axis(outside, idx, False, axis=-1, inplace=False)
    lrest = jax.nn.logsumexp(jnp.where(outside, logp, -jnp.inf), axis=-1)
    return Teacher(top, idx.astype(jnp.int32), lrest)


def distill_loss_topk(merged_logits: jax.Array, teacher: Teacher, mask: jax.Array) -> jax.Array:
    """Mean KL from the teacher to `softmax(merged_logits)`, both coarsened to the teacher's top k plus a rest bin.

    merged_logits `[B, S, V]`, teacher: `teacher_topk` of `[B, S, V]` logits, mask `[B, S]`.
    Equals `distill_loss` when the teacher kept every token; below it otherwise.
    """
    logq = jax.nn.log_softmax(merged_logits.astype(ada.work_dtype(merged_logits.dtype)), axis=-1)
    logq_k = jnp.take_along_axis(logq, teacher.idx, axis=-1)
    outside = jnp.put_along_axis(jnp.ones(logq.shape, bool), teacher.idx, False, axis=-1, inplace=False)
    logq_rest = jax.nn.logsumexp(jnp.where(outside, logq, -jnp.inf), axis=-1)
    kl = jnp.sum(_xlogy_ratio(teacher.logp, logq_k), axis=-1) + _xlogy_ratio(teacher.lrest, logq_rest)
    return _masked_mean(kl, mask)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _teacher_batch(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array, k: int) -> Teacher:
    return teacher_topk(nnx.merge(graphdef, state)(ids, mask), k)


def _pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def distill_batches(
    graphdef: nnx.GraphDef,
    specialists: Sequence[nnx.State],
    windows: Sequence[tuple[np.ndarray, np.ndarray]],
    batch_size: int,
    topk: int = DISTILL_TOPK,
) -> dict[str, Any]:
    """Task `t`'s windows `(input_ids, mask)` `[N_t, S_t]` and specialist `t`'s `Teacher` on them, batched.

    Returns `{"input_ids", "mask"}` `[NB, T, b, S]` and `"teacher"` (leaves
    `[NB, T, b, S(, k)]`), `S = max S_t`, `NB = ceil(max N_t / b)`: shorter
    windows and tasks with fewer batches are padded with masked positions (right
    padding: causal models' real positions see the same context).
    """
    if len(windows) != len(specialists):
        raise ValueError(f"{len(specialists)} specialists but {len(windows)} calibration sets")
    n = max(ids.shape[0] for ids, _ in windows)
    s = max(ids.shape[1] for ids, _ in windows)
    per_task = [
        ada.calibration_batches(_pad(ids, (n, s)), _pad(np.asarray(m), (n, s)), batch_size) for ids, m in windows
    ]
    teachers = [
        [_teacher_batch(graphdef, st, b["input_ids"][i], b["mask"][i], topk) for i in range(b["mask"].shape[0])]
        for st, b in zip(specialists, per_task, strict=True)
    ]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *per_task)  # [NB, T, b, S]
    teacher = jax.tree.map(
        lambda *xs: jnp.stack(xs, axis=1),  # over tasks, each stacked over batches
        *[jax.tree.map(lambda *ys: jnp.stack(ys), *ts) for ts in teachers],
    )
    return {**stacked, "teacher": teacher}


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """`loss_fn(coeffs, base, taus, batch)` for `learn_coefficients`: the sum over tasks of `distill_loss_topk`.

    batch: one of `distill_batches`' (`input_ids` / `mask` `[T, b, S]`, the
    teacher `[T, b, S, k]`); every task's windows go through the merged model
    in one forward of `T b` windows. Hashable (by graphdef and `remat`).
    """

    graphdef: nnx.GraphDef
    remat: bool = True

    def __call__(self, coeffs: jax.Array, base: nnx.State, taus: nnx.State, batch: dict[str, Any]) -> jax.Array:
        ids, mask = batch["input_ids"], batch["mask"]
        t, b, s = ids.shape
        flat = ada.merged_logits(
            self.graphdef, base, taus, coeffs, ids.reshape(t * b, s), mask.reshape(t * b, s), remat=self.remat
        )
        logits = flat.reshape(t, b, s, -1)
        return jnp.sum(jax.vmap(distill_loss_topk)(logits, batch["teacher"], mask))


def merge_with_distilled_coefficients(
    base_model: nnx.Module,
    finetuned: Sequence[nnx.Module],
    windows: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    batch_size: int = 8,
    topk: int = DISTILL_TOPK,
    remat: bool = True,
    **learning: Any,
) -> tuple[nnx.Module, jax.Array, jax.Array]:
    """AdaMerging with the distillation objective; returns `(merged model, coeffs [L+1,T], losses)`.

    windows: task `t`'s own calibration windows `(input_ids, mask)` `[N_t, S_t]`,
    one per fine-tune (its teacher: fine-tune `t` on them). learning:
    `adamerging.learn_merge`'s keywords (steps, learning_rate, init, seed, clip,
    trim, densities, trim_options, callback). `losses[k]`: the summed KL before step `k`.
    """

    def objective(graphdef: nnx.GraphDef, specialists: Sequence[nnx.State]) -> tuple[ada.LossFn, Any]:
        return DistillLoss(graphdef, remat), distill_batches(graphdef, specialists, windows, batch_size, topk)

    return ada.learn_merge(base_model, finetuned, objective, **learning)
