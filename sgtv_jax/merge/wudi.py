"""WUDI merging (Cheng et al. 2025): data-free, the task vectors stand in for each layer's inputs.

For a linear layer (PyTorch layout, task vectors `tau_t` `[out, in]`) the
paper shows the inputs a fine-tune saw lie close to the span of its task
vector's rows, so the rows of `tau_t` serve as that task's calibration inputs
`X_t = tau_t^T`. The merged task vector minimises the interference on them,

    L(M) = sum_t || (M - tau_t) tau_t^T ||_F^2 / ||tau_t||_F^2,

RegMean's objective (`sgtv_jax.merge.regmean`) with the proxy Grams
`G_t = tau_t^T tau_t / ||tau_t||_F^2` `[in, in]`. We run the paper's (and
FusionBench's) solver: `M` starts from the task-arithmetic sum `sum_t tau_t`
and takes `steps` Adam steps of size `learning_rate` (300 and 1e-5), an early
stop near the sum rather than the closed-form minimum (which is
`regmean(deltas, 1 / ||tau_t||^2, grams=tau^T tau, alpha=1)`). Each step
costs one `[out, in] x [in, in]` product: the gradient is `2 (M A - B)` with
`A = sum_t G_t`, `B = sum_t tau_t G_t`, both formed once; for a tensor much
wider than tall (`2 T out < in`: an embedding in its `[hidden, vocab]` view)
it is formed from `[out, out]` products instead, `2 sum_t (M tau_t^T -
tau_t tau_t^T) tau_t / ||tau_t||^2`, never an `[in, in]` Gram. The loop is
one compiled program per shape and setting (`_adam_jit`), reused by every
layer of that shape: eager `lax.cond` / `lax.scan` compiled it per call.
`solver="exact"` returns the minimiser nearest the sum instead (`exact_fit`:
one pseudo-inverse, no steps).

Per-model weights scale the task vectors (`tau_t -> w_t tau_t`, task
arithmetic's rule). Tensors that are not 2-D get the sum `sum_t w_t tau_t`;
a task vector that is all zeros (a layer the fine-tune left alone) drops out
of the loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sgtv_jax import _checks
from sgtv_jax.defaults import MAX_LEARNING_STEPS
from sgtv_jax.merge import combine
from sgtv_jax.merge.methods import Floats

_HP = jax.lax.Precision.HIGHEST
SOLVERS = ("adam", "exact")


def _unit(deltas: jax.Array) -> jax.Array:
    """`tau_t / ||tau_t||_F` of `[T, out, in]`; a zero task vector stays zero (it drops out of the loss)."""
    sq = jnp.sum(deltas * deltas, axis=(1, 2))
    return deltas * jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)[:, None, None]


def proxy_grams(deltas: jax.Array) -> jax.Array:
    """The proxy Grams `G_t = tau_t^T tau_t / ||tau_t||_F^2` `[T, in, in]` of `deltas` `[T, out, in]`.

    Each has trace 1; a zero task vector has `G_t = 0`. (`gram_balance` adds them to data Grams.)
    """
    xs = _unit(deltas)
    return jnp.einsum("toi,toj->tij", xs, xs, precision=_HP)


def wudi_grams(deltas: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`A = sum_t G_t` `[in, in]` and `B = sum_t tau_t G_t` `[out, in]`, `G_t = tau_t^T tau_t / ||tau_t||^2`.

    deltas: `[T, out, in]` (already weighted). A zero task vector has `G_t = 0`.
    """
    g = proxy_grams(deltas)  # [T, in, in]
    return combine.sum_tasks(g), jnp.einsum("toi,tij->oj", deltas, g, precision=_HP)


def wudi(
    deltas: jax.Array,
    weights: Floats = 1.0,
    *,
    steps: int = 300,
    learning_rate: float = 1e-5,
    solver: str = "adam",
    name: str | None = None,
) -> jax.Array:
    """Merged task vector `[out, in]` from `deltas` `[T, out, in]`: `steps` Adam steps on `L` from the sum.

    Args:
      deltas: task vectors `[T, ...]`; 2-D tensors are fitted, others summed.
      weights: per-task weights `[T]`, scaling each task vector (default 1).
      steps: Adam steps (static: the length of the compiled loop), >= 0.
      learning_rate: Adam's step size (may be traced), > 0.
      solver: "adam" (the paper's early-stopped fit) or "exact" (the minimiser of `L`
        nearest the sum, `exact_fit`; `steps` and `learning_rate` unused).
    Returns: float32 (float64 for float64 input). Jit- and vmap-able; deterministic.
    """
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    tasks = x.shape[0]
    w = _checks.per_task_values(weights, tasks, "weights", name, guard)
    if isinstance(steps, bool) or int(steps) != steps or not 0 <= steps <= MAX_LEARNING_STEPS:
        raise ValueError(
            f"wudi steps must be a non-negative integer <= {MAX_LEARNING_STEPS}, got {steps!r}{_checks.where(name)}"
        )
    if _checks.is_traced(learning_rate):
        guard.require(learning_rate > 0, f"wudi learning_rate must be > 0{_checks.where(name)}")
    elif not float(learning_rate) > 0:
        raise ValueError(f"wudi learning_rate must be > 0, got {learning_rate!r}{_checks.where(name)}")
    if solver not in SOLVERS:
        raise ValueError(f"wudi solver must be one of {SOLVERS}, got {solver!r}{_checks.where(name)}")
    dt = _checks.work_dtype(x.dtype)
    x = x.astype(dt) * combine.broadcast_weights(jnp.asarray(w, dt), x.ndim)
    total = combine.sum_tasks(x)
    if x.ndim != 3 or (steps == 0 and solver == "adam"):
        return guard.apply(total)
    if solver == "exact":
        return guard.apply(_exact_jit(x, total))
    _, out, cols = x.shape
    wide = 2 * tasks * out < cols  # an embedding in its [hidden, vocab] view: [out, out] products, no [in, in] Gram
    if wide:
        xs = _unit(x)
        ops = (xs, jnp.einsum("toi,tpi->top", xs, x, precision=_HP))  # [T, out, in], [T, out, out]
    else:
        ops = wudi_grams(x)  # [in, in], [out, in]
    # a tensor no fine-tune changed (embeddings of top-block fine-tunes) skips the loop: its gradient is 0
    changed = jnp.any(x != 0)
    if _checks.is_traced(learning_rate):
        merged = _adam(total, ops, changed, learning_rate, steps=int(steps), wide=wide)
    else:  # one compiled program per shape and setting, reused by every tensor of that shape
        merged = _adam_jit(total, ops, changed, lr=float(learning_rate), steps=int(steps), wide=wide)
    return guard.apply(merged)


def _adam(
    total: jax.Array, ops: tuple[jax.Array, jax.Array], changed: jax.Array, lr: Any, *, steps: int, wide: bool
) -> jax.Array:
    """`steps` Adam steps of size `lr` on `L` from `total` `[out, in]` (itself when not `changed`).

    ops: `(A [in, in], B [out, in])` (`wudi_grams`), or for a `wide` tensor
    `(tau_t / ||tau_t|| [T, out, in], K [T, out, out])`.
    """
    opt = optax.adam(lr)
    if wide:
        xs, k = ops

        def grad(m: jax.Array) -> jax.Array:
            p = jnp.einsum("oi,tpi->top", m, xs, precision=_HP)
            return 2.0 * jnp.einsum("top,tpi->oi", p - k, xs, precision=_HP)
    else:
        a, b = ops

        def grad(m: jax.Array) -> jax.Array:
            return 2.0 * (jnp.matmul(m, a, precision=_HP) - b)

    def step(carry, _):
        m, state = carry
        updates, state = opt.update(grad(m), state, m)
        return (optax.apply_updates(m, updates), state), None

    def fit(m0: jax.Array) -> jax.Array:
        (m, _), _ = jax.lax.scan(step, (m0, opt.init(m0)), None, length=steps)
        return m

    return jax.lax.cond(changed, fit, lambda m: m, total)


# Eager `lax.cond` / `lax.scan` compile their bodies anew on every call (the closures differ);
# jitted with the step size static (a constant in the program, as in the eager call) it compiles once.
_adam_jit = jax.jit(_adam, static_argnames=("lr", "steps", "wide"))


def exact_fit(deltas: jax.Array, total: jax.Array) -> jax.Array:
    """The minimiser of `L` nearest `total` (the sum) `[out, in]`, from weighted `deltas` `[T, out, in]`.

    `L`'s gradient `2 (M A - B)` vanishes on `M A = B`; every gradient step moves
    `M` within the row space of `X = [tau_t / ||tau_t||]` `[T out, in]` (the span
    of `A`), so gradient descent from the sum converges to `S + Z X` with
    `Z = (C - S X^T) K^+`, `K = X X^T` `[T out, T out]` and `C = [tau_t X_t^T]_t`
    `[out, T out]`; with `T out >= in` the same point is `S + (B - S A) A^+`
    (one `[in, in]` pseudo-inverse instead). Directions no task vector spans
    keep the sum's entries. No early stop: Adam's long runs reach a minimiser too
    (this one when the task vectors span every input: then it is unique).
    """
    tasks, out, cols = deltas.shape
    xs = _unit(deltas)
    if tasks * out < cols:  # the row side is smaller: a [T out, T out] pseudo-inverse
        xr = xs.reshape(tasks * out, cols)
        c = jnp.einsum("toi,tpi->pto", xs, deltas, precision=_HP).reshape(out, tasks * out)
        kp = jnp.linalg.pinv(jnp.matmul(xr, xr.T, precision=_HP), hermitian=True)
        z = jnp.matmul(c - jnp.matmul(total, xr.T, precision=_HP), kp, precision=_HP)
        return total + jnp.matmul(z, xr, precision=_HP)
    a, b = wudi_grams(deltas)
    r = b - jnp.matmul(total, a, precision=_HP)
    return total + jnp.matmul(r, jnp.linalg.pinv(a, hermitian=True), precision=_HP)


_exact_jit = jax.jit(exact_fit)
