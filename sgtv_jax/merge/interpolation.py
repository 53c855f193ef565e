"""Spherical interpolation merges with mergekit's names and rules: slerp, nuslerp, multislerp, karcher.

Same convention as every method in `sgtv_jax.merge`: the input is the stack of
task vectors `deltas` `[T, ...]` (`tau_t = theta_t - theta_0`) and `weights`
`[T]`; the output is the merged task vector `[...]` (float32, or float64 for
float64 input), so the merged tensor is `theta_0 + result`. Methods that
mergekit defines on the models' weights themselves (`slerp`, `karcher`) also
take `base` (`theta_0`, same shape as one task vector) and work on
`theta_t = base + tau_t`. `nuslerp` and `multislerp` work on task vectors
(mergekit's form with a `base_model`); `multislerp(..., whole_weights=True,
base=theta_0)` is mergekit's form without one (it interpolates `theta_t`, the
pipeline's choice when a config leaves `base_model` out; the first model is
then `theta_0`). `karcher` is mergekit's on the weights with or without a base.

Traced arguments (`jit`, `vmap`, `grad`): `t`, `weights`, `eps`, `tol` and the
tensors; the flags (`nuslerp_flatten`, `nuslerp_row_wise`,
`normalize_weights`) and `max_iter` select the program. mergekit's branches
(near-parallel fallback to linear interpolation, zero norms, convergence) are
`where` selections, so the same program serves every input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge import combine
from sgtv_jax.merge.methods import Floats

KARCHER_MAX_ITER = 10_000
"""karcher's `max_iter` bound: it converges in tens of iterations; 10k bounds a tensor's loop to seconds."""
SLERP_DOT_THRESHOLD = 0.9995
"""slerp interpolates linearly when `|cos(angle)|` of the two models exceeds this (mergekit's value)."""


def _stack(deltas, name, guard, tasks: int | None = None, method: str = "") -> jax.Array:
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    if tasks is not None and x.shape[0] != tasks:
        raise ValueError(
            f"{method} merges exactly {tasks + 1} models (the base and {tasks} other"
            f"{'s' if tasks > 1 else ''}), got {x.shape[0]} fine-tuned model(s){_checks.where(name)}"
        )
    return x.astype(_checks.work_dtype(x.dtype))


def _base(base, like: jax.Array, method: str, name: str | None) -> jax.Array:
    if base is None:
        raise ValueError(f"{method} works on whole weights and needs base=theta_0{_checks.where(name)}")
    b = _checks.as_array(base, "base")
    if tuple(b.shape) != tuple(like.shape[1:]):
        raise ValueError(
            f"base has shape {tuple(b.shape)} but the task vectors {tuple(like.shape[1:])}{_checks.where(name)}"
        )
    return b.astype(like.dtype)


def unit_weights(weights: Floats, tasks: int, method: str, name: str | None, guard: _checks.Guard) -> None:
    """Methods without per-model weights refuse any weight other than 1 (traced: a guard check)."""
    w = _checks.per_task_values(1.0 if weights is None else weights, tasks, "weights", name, guard)
    msg = (
        f"{method} takes no per-model weight (mergekit has none for it), got weights "
        f"{list(w) if isinstance(w, tuple) else '(traced)'}{_checks.where(name)}"
    )
    guard.require(jnp.all(jnp.asarray(w) == 1.0), msg, f"{method} takes no per-model weight{_checks.where(name)}")


def one_model_stack(
    deltas: jax.Array, weights: Floats, method: str, name: str | None, guard: _checks.Guard
) -> jax.Array:
    """The `[1, ...]` stack of a method that merges the base with exactly one other model (weight 1)."""
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    if x.shape[0] != 1:
        raise ValueError(
            f"{method} merges exactly two models (the base and one other), got {x.shape[0]} "
            f"fine-tuned models{_checks.where(name)}"
        )
    unit_weights(weights, 1, method, name, guard)
    return x


def slerp(
    deltas: jax.Array,
    weights: Floats = 1.0,
    *,
    t: float | jax.Array | None = None,
    base: jax.Array | None = None,
    name: str | None = None,
) -> jax.Array:
    """SLERP between the base model (`t = 0`) and the one other model (`t = 1`).

    With `v0 = theta_0`, `v1 = theta_0 + tau` over the whole tensor and
    `c = <v0/|v0|, v1/|v1|>` (a norm <= 1e-8 is not divided by): if `|c| >
    0.9995`, `(1 - t) v0 + t v1`; else with `a = arccos c`,
    `sin((1-t) a)/sin a * v0 + sin(t a)/sin a * v1`. deltas `[1, ...]`, base
    `[...]`; `t` may be any real (mergekit requires it; gradients over layers
    come as one `t` per tensor). Returns the task vector of the result.
    """
    guard = _checks.Guard()
    x = _stack(deltas, name, guard, 1, "slerp")
    unit_weights(weights, 1, "slerp", name, guard)
    if t is None:
        raise ValueError(f"slerp needs t (0: the base model, 1: the other model){_checks.where(name)}")
    guard.finite(jnp.asarray(t), "t")
    v0 = _base(base, x, "slerp", name)
    d = x[0]
    v1 = v0 + d
    t = jnp.asarray(t, x.dtype)

    def unit(v):
        n = jnp.linalg.norm(v.reshape(-1))
        return jnp.where(n > 1e-8, v / jnp.where(n > 1e-8, n, 1), v)

    dot = jnp.sum(unit(v0) * unit(v1))
    linear = jnp.abs(dot) > SLERP_DOT_THRESHOLD
    theta = jnp.arccos(jnp.where(linear, 0.0, dot))
    sin = jnp.sin(theta)
    s0 = jnp.sin(theta - theta * t) / sin
    s1 = jnp.sin(theta * t) / sin
    # s0 v0 + s1 v1 - v0 = (s0 + s1 - 1) v0 + s1 tau: no cancellation of v0
    spherical = (s0 + s1 - 1) * v0 + s1 * d
    return guard.apply(jnp.where(linear, t * d, spherical))


def _nuslerp_pairs(v0: jax.Array, v1: jax.Array, t: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Slerp of the vectors along the last axis of `v0`, `v1` (mergekit's nuslerp kernel)."""

    def unit(v):
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-7)

    cos = jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True)
    theta = jnp.arccos(jnp.clip(cos, -1, 1))
    sin = jnp.sin(theta)
    colinear = jnp.abs(sin) < eps
    safe = jnp.where(colinear, 1, sin)
    spherical = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / safe
    return jnp.where(colinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp(
    deltas: jax.Array,
    weights: Floats,
    *,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    name: str | None = None,
) -> jax.Array:
    """NuSLERP: slerp of two task vectors at `t = w_1 / (w_0 + w_1)` (0.5 when `|w_0 + w_1| < 1e-6`).

    `nuslerp_flatten` (default): one slerp over the whole tensor. Otherwise one
    per vector: along the last axis (`v[i, :]` of an `[out, in]` matrix), or
    with `nuslerp_row_wise` along the first axis (`v[:, j]`), as mergekit
    computes them. Vectors are normalised with norms clamped at 1e-7; where
    `|sin(angle)| < 1e-8` the pair is interpolated linearly. deltas `[2, ...]`.
    """
    guard = _checks.Guard()
    x = _stack(deltas, name, guard, 2, "nuslerp")
    w = jnp.asarray(_checks.per_task_values(weights, 2, "weights", name, guard), x.dtype)
    total = w[0] + w[1]
    t = jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(jnp.abs(total) < 1e-6, 1, total))
    v0, v1 = x[0], x[1]
    if nuslerp_flatten or v0.ndim == 0:
        out = _nuslerp_pairs(v0.reshape(-1), v1.reshape(-1), t)
    elif nuslerp_row_wise:
        out = jnp.swapaxes(_nuslerp_pairs(jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1), t), 0, -1)
    else:
        out = _nuslerp_pairs(v0, v1, t)
    return guard.apply(out.reshape(v0.shape))


def multislerp(
    deltas: jax.Array,
    weights: Floats,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    whole_weights: bool = False,
    base: jax.Array | None = None,
    name: str | None = None,
) -> jax.Array:
    """Multi-SLERP: a weighted barycentre of the task vectors on the sphere, rescaled.

    With `whole_weights` the points are the weights `theta_t = base + tau_t`
    (mergekit without `base_model`; `base` required), the result is returned as
    `result - base`; otherwise `base` is not read.

    With `u_t = tau_t / (|tau_t| + eps)` and weights `w` (divided by their sum
    when `normalize_weights`): `m = sum_t w_t u_t / |sum_t w_t u_t|`; tangent
    vectors `g_t = u_t - <u_t, m> m`, `g = sum_t w_t g_t`, `n = |g| + eps`;
    result `(m cos n + g sin n / n) * sum_t w_t |tau_t|`. When
    `|sum_t w_t u_t| < eps`: two models give `w_0 tau_0 + w_1 tau_1`; more are
    an error (antipodal vectors balanced by their weights). One model: `tau_0`.
    """
    guard = _checks.Guard()
    x = _stack(deltas, name, guard)
    tasks = x.shape[0]
    w = jnp.asarray(_checks.per_task_values(weights, tasks, "weights", name, guard), x.dtype)
    if tasks == 1:
        return guard.apply(x[0])
    if whole_weights:
        b = _base(base, x, "multislerp with whole_weights", name)
        return guard.apply(_multislerp(b[None] + x, w, normalize_weights, eps, name, guard) - b)
    return guard.apply(_multislerp(x, w, normalize_weights, eps, name, guard))


def _multislerp(
    x: jax.Array, w: jax.Array, normalize_weights: bool, eps: float, name: str | None, guard: _checks.Guard
) -> jax.Array:
    """`multislerp` of the points `x` `[T >= 2, ...]` with weights `w` `[T]` -> `[...]`."""
    tasks = x.shape[0]
    if normalize_weights:
        total = jnp.sum(w)
        guard.require(
            total != 0, f"multislerp with normalize_weights needs weights that do not sum to 0{_checks.where(name)}"
        )
        w = w / total
    flat = x.reshape(tasks, -1)
    norms = jnp.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = combine.sum_tasks(units * w[:, None])
    mean_norm = jnp.linalg.norm(mean)
    degenerate = mean_norm < eps
    if tasks > 2:
        guard.require(
            ~degenerate,
            f"multislerp: the weighted sum of the unit task vectors is zero{_checks.where(name)} (antipodal vectors "
            "whose weights balance out); use different weights",
        )
    m = mean / jnp.where(degenerate, 1, mean_norm)
    tangents = units - jnp.sum(units * m, axis=-1, keepdims=True) * m
    g = combine.sum_tasks(tangents * w[:, None])
    n = jnp.linalg.norm(g) + eps
    out = (m * jnp.cos(n) + g * (jnp.sin(n) / n)) * jnp.sum(norms[:, 0] * w)
    if tasks == 2:
        out = jnp.where(degenerate, w[0] * flat[0] + w[1] * flat[1], out)
    return out.reshape(x.shape[1:])


def karcher(
    deltas: jax.Array,
    weights: Floats = 1.0,
    *,
    max_iter: int = 10,
    tol: float | jax.Array = 1e-5,
    base: jax.Array | None = None,
    name: str | None = None,
) -> jax.Array:
    """Karcher (Riemannian) mean of the models on the unit sphere, scaled by their mean norm.

    Points `theta_t = base + tau_t` with `a_t = w_t / sum w` (weights 1: mergekit's
    equal weights). `n_t = |theta_t|`; points with `n_t <= tol` are left out and
    the others' `a_t` renormalised. Start at the normalised weighted mean of the
    unit vectors (the first valid one if that mean has norm < tol), then up to
    `max_iter` times: `T = sum_t a_t theta_t/sin(theta_t) (u_t - cos(theta_t) u)`
    over points at angle `theta_t >= tol`; stop when `|T| < tol`; else
    `u <- cos|T| u + sin|T| T/|T|`, renormalised. Result `(sum_t a_t n_t) u`
    (all points), returned as a task vector; zero when no point is valid.
    """
    guard = _checks.Guard()
    x = _stack(deltas, name, guard)
    tasks = x.shape[0]
    max_iter = _checks.check_positive_int(max_iter, "max_iter") if not _checks.is_traced(max_iter) else max_iter
    # the declared bound (KARCHER_MAX_ITER, the row's `hi`): with tol 0 the loop runs max_iter times
    guard.require(
        jnp.asarray(max_iter) <= KARCHER_MAX_ITER, f"max_iter must be <= {KARCHER_MAX_ITER}{_checks.where(name)}"
    )
    guard.require(jnp.asarray(tol) >= 0, f"tol must be >= 0{_checks.where(name)}")
    w = jnp.asarray(_checks.per_task_values(weights, tasks, "weights", name, guard), x.dtype)
    guard.require(jnp.sum(w) != 0, f"karcher needs weights that do not sum to 0{_checks.where(name)}")
    b = _base(base, x, "karcher", name)
    pts = (b[None] + x).reshape(tasks, -1)
    if tasks == 1:
        return guard.apply(x[0])
    tol = jnp.asarray(tol, x.dtype)
    alphas = w / jnp.sum(w)
    norms = jnp.linalg.norm(pts, axis=-1)
    units = pts / jnp.where(norms > 0, norms, 1)[:, None]
    valid = norms > tol
    a = jnp.where(valid, alphas, 0)
    any_valid = jnp.any(valid)
    a = a / jnp.where(any_valid, jnp.sum(a), 1)
    u = combine.sum_tasks(a[:, None] * units)
    nu = jnp.linalg.norm(u)
    first = units[jnp.argmax(valid)]
    u = jnp.where(nu < tol, first, u / jnp.where(nu < tol, 1, nu))

    def step(state):
        i, u, _ = state
        dots = jnp.clip(units @ u, -1.0, 1.0)
        theta = jnp.arccos(dots)
        moving = theta >= tol
        coef = jnp.where(moving, a * theta / jnp.where(moving, jnp.sin(theta), 1), 0)
        tangent = combine.sum_tasks(coef[:, None] * (units - dots[:, None] * u[None]))
        nt = jnp.linalg.norm(tangent)
        done = nt < tol
        safe = jnp.where(done, 1, nt)
        new = jnp.cos(nt) * u + jnp.sin(nt) * (tangent / safe)
        nn = jnp.linalg.norm(new)
        new = jnp.where(nn > tol, new / jnp.where(nn > tol, nn, 1), new)
        return i + 1, jnp.where(done, u, new), done

    _, u, _ = jax.lax.while_loop(lambda s: (s[0] < max_iter) & ~s[2], step, (0, u, jnp.asarray(False)))
    scale = jnp.sum(alphas * norms)
    out = jnp.where(any_valid, scale * u, 0).reshape(x.shape[1:]) - b
    return guard.apply(out)
