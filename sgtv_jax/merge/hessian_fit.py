"""Hessian-optimal combination of (trimmed) task vectors: the merged layer fits every task's outputs.

For a linear layer `y = W x` (PyTorch layout, task vectors `D_t` `[out, in]`)
with per-task input Grams `G_t = X_t X_t^T` `[in, in]` (the calibration
Hessians; a shared `[in, in]` Gram serves every task), the objective that
calibration data lets us solve is the merged layer's error on every task's
inputs,

    f(M) = sum_t w_t || (M - D_t) X_t ||^2 = sum_t w_t tr((M - D_t) G_t (M - D_t)^T).

Three ways to minimise it, each a merge method (`specs.METHOD_SPECS`):

* `lstsq`: `M = sum_s lambda_s D'_s` over the trimmed (optionally sign-elected)
  task vectors `D'_s`; the `T` coefficients solve the `T x T` normal equations
  `A lambda = b`, `A_sr = sum_t w_t tr(D'_s G_t D'_r^T)`,
  `b_s = sum_t w_t tr(D'_s G_t D_t^T)`. Any trim composes; the result is as
  sparse as the union of the trimmed supports.
* `regmean_trim`: RegMean's closed form on the trimmed task vectors,
  `M = (sum_t w_t D'_t G~_t)(sum_t w_t G~_t)^-1` (dense).
* `regmean_sparse`: one sparse task vector: the dense RegMean optimum `M*`
  trimmed once at the mean density, an OBS trim against `S = sum_t w_t G~_t`.
  With `alpha = 1`, `f(M) = f(M*) + tr((M - M*) S (M - M*)^T)` exactly, so OBS
  on `S` minimises the merge objective itself among sparse `M`.

`G~_t = alpha G_t + (1 - alpha) diag(G_t)` is RegMean's regularised Gram
(`sgtv_jax.merge.regmean`). `gram_norm` / `proxy_gram` replace each `G_t` by
its balanced, task-vector-augmented Gram first (`sgtv_jax.merge.gram_balance`;
the untrimmed task vectors `D_t` define the normalisers and proxies), so
`regmean_sparse` then prunes by OBS against the sum of those. Without Grams (tensors that are not linear
layers) every method falls back to the weighted mean of its (trimmed) inputs,
RegMean's rule, or with `no_gram="sum"` to their weighted sum (`gram_balance.without_gram`).

Weights, densities, `gamma` and `epsilon` may be traced (inside a caller's
`jit` / `vmap`, `batch.merge_grid`): value checks then go through
`_checks.Guard` (a checkify user check and a NaN result), as the other
merge methods do; known values keep the eager checks and messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.merge import combine, elect
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.gram_balance import augmented_grams, check_options, without_gram
from sgtv_jax.merge.methods import TrimOptions, resolve_rescale
from sgtv_jax.merge.regmean import regmean
from sgtv_jax.merge.trim import Calibration

Floats = float | Sequence[float]
SIGN_ELECTION = ("none",) + elect.CONSENSUS
_HP = jax.lax.Precision.HIGHEST


def _stacked_grams(grams: jax.Array, tasks: int, cols: int, dt: jnp.dtype, name: str | None) -> jax.Array:
    """`grams` `[in, in]` or `[T, in, in]` -> `[T, in, in]` in `dt`; ValueError naming the tensor."""
    g = jnp.asarray(grams).astype(dt)
    if g.shape not in ((cols, cols), (tasks, cols, cols)):
        raise ValueError(
            f"grams must have shape {(cols, cols)} or {(tasks, cols, cols)} for {tasks} task vectors "
            f"with {cols} input columns, got {tuple(g.shape)}{_checks.where(name)}"
        )
    # raises now when the values are known; under jit / vmap a NaN result instead (never a silent merge)
    guard = _checks.Guard()
    guard.finite(g, f"grams{_checks.where(name)}")
    return guard.apply(jnp.broadcast_to(g, (tasks, cols, cols)))


def _fit_grams(
    grams: jax.Array, targets: jax.Array, gram_norm: str, proxy_gram: float | jax.Array, name: str | None
) -> jax.Array:
    """The Grams a fit reads: `grams` balanced and augmented for `targets` `[T, out, in]` (`gram_balance`).

    `gram_norm` "none" with a known `proxy_gram` 0: `grams` as given (the fits stay bit for bit).
    """
    if gram_norm == "none" and not _checks.is_traced(proxy_gram) and float(proxy_gram) == 0.0:
        return grams
    tasks, _, cols = targets.shape
    g = _stacked_grams(grams, tasks, cols, targets.dtype, name)
    return augmented_grams(g, targets, gram_norm, proxy_gram)


def _targets(x: jax.Array, targets: jax.Array | None, name: str | None) -> jax.Array:
    """The task vectors a fit reproduces: `targets` (same shape as `x` `[T, ...]`), default `x`."""
    tgt = x if targets is None else jnp.asarray(targets).astype(x.dtype)
    if tgt.shape != x.shape:
        raise ValueError(
            f"targets must have the task vectors' shape {tuple(x.shape)}, got {tuple(tgt.shape)}{_checks.where(name)}"
        )
    return tgt


def normal_equations(
    trimmed: jax.Array, targets: jax.Array, grams: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`A` `[T, T]` and `b` `[T]` of `min_lambda f(sum_s lambda_s D'_s)`.

    trimmed, targets: `[T, out, in]` (`D'`, `D`); grams: `[T, in, in]`; weights `[T]`.
    `A_sr = sum_t w_t tr(D'_s G_t D'_r^T)`, `b_s = sum_t w_t tr(D'_s G_t D_t^T)`.
    """
    tasks = trimmed.shape[0]
    a = jnp.zeros((tasks, tasks), trimmed.dtype)
    b = jnp.zeros((tasks,), trimmed.dtype)
    for t in range(tasks):  # one [T, out, in] product per task's Gram: memory T * out * in
        y = jnp.einsum("soi,ij->soj", trimmed, grams[t], precision=_HP) * weights[t]
        a = a + jnp.einsum("soj,roj->sr", y, trimmed, precision=_HP)
        b = b + jnp.einsum("soj,oj->s", y, targets[t], precision=_HP)
    return (a + a.T) / 2, b


def solve_coefficients(a: jax.Array, b: jax.Array, start: jax.Array, rtol: float | None = None) -> jax.Array:
    """The minimiser of `l^T A l - 2 b^T l` nearest to `start` `[T]` (A `[T, T]` positive semidefinite).

    `start + pinv(A) (b - A start)`: directions the data leave undetermined (a
    zero task vector, two identical ones) keep `start`'s coefficients.
    Eigenvalues below `rtol * max` count as zero (default `10 T eps`).
    """
    tasks = a.shape[0]
    tol = rtol if rtol is not None else 10 * tasks * float(jnp.finfo(a.dtype).eps)
    vals, vecs = jnp.linalg.eigh(a)
    keep = vals > tol * jnp.maximum(jnp.max(vals), jnp.finfo(a.dtype).tiny)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, vals, 1.0), 0.0)
    resid = b - a @ start
    return start + vecs @ (inv * (vecs.T @ resid))


def lstsq_coefficients(
    trimmed: jax.Array,
    targets: jax.Array,
    grams: jax.Array,
    weights: Floats | jax.Array = 1.0,
    *,
    name: str | None = None,
) -> jax.Array:
    """The `T` coefficients `lambda` minimising `sum_t w_t ||(sum_s lambda_s D'_s - D_t) X_t||^2`.

    trimmed, targets: `[T, out, in]`; grams: `G_t = X_t X_t^T`, `[in, in]` or `[T, in, in]`;
    weights `[T]`. Undetermined directions keep the weighted mean's coefficients `w / sum(w)`.
    """
    guard = _checks.Guard()
    x = _checks.stack(trimmed, name, guard=guard)
    tasks = x.shape[0]
    dt = _checks.work_dtype(x.dtype)
    w = jnp.asarray(_checks.per_task_values(weights, tasks, "weights", name, guard), dt)
    d = jnp.asarray(targets).astype(dt)
    if d.shape != x.shape or x.ndim != 3:
        raise ValueError(
            f"lstsq needs trimmed and target task vectors of one shape [T, out, in], got "
            f"{tuple(x.shape)} and {tuple(d.shape)}{_checks.where(name)}"
        )
    g = _stacked_grams(grams, tasks, x.shape[-1], dt, name)
    a, b = normal_equations(x.astype(dt), d, g, w)
    total = jnp.sum(w)
    start = w / jnp.where(jnp.abs(total) < 1e-12, 1.0, total)
    return guard.apply(solve_coefficients(a, b, start))


def _trim_inputs(
    deltas: jax.Array,
    densities: Floats | jax.Array,
    trim: str | None,
    rescale: bool | None,
    count: str,
    name: str | None,
    guard: _checks.Guard,
    opts: TrimOptions,
) -> jax.Array:
    """The trimmed stack (the stack itself without a trim; densities < 1 then refused).

    Traced densities are checked through `guard` (the caller applies it to its result).
    """
    tasks = deltas.shape[0]
    dens = _checks.densities_values(densities, tasks, name, guard)
    if trim is None:
        if isinstance(dens, tuple):
            if any(v != 1.0 for v in dens):
                raise ValueError(f"densities {list(dens)} < 1 need a trim (trim=...){_checks.where(name)}")
        else:
            guard.require(dens == 1.0, f"densities < 1 need a trim (trim=...){_checks.where(name)}")
        return deltas
    rescale = resolve_rescale(rescale, False, trim)  # off by default for every method here
    return opts.trim(
        trim, deltas, list(dens) if isinstance(dens, tuple) else dens, rescale=rescale, count=count, name=name
    )


def _fit_stack(
    x: jax.Array,
    targets: jax.Array | None,
    densities: Floats | jax.Array,
    trim: str | None,
    rescale: bool | None,
    count: str,
    opts: TrimOptions,
    name: str | None,
    guard: _checks.Guard,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What `lstsq` and `regmean_trim` fit, each `[T, ...]`: the stack `x` in its work dtype, the targets
    (`targets`, default the untrimmed stack) and the trimmed stack."""
    x = x.astype(_checks.work_dtype(x.dtype))
    return x, _targets(x, targets, name), _trim_inputs(x, densities, trim, rescale, count, name, guard, opts)


def lstsq(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    trim: str | None = "magnitude",
    rescale: bool | None = None,
    count: str = "round",
    sign_election: str = "none",
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = trim_lib.GAMMA,
    epsilon: Floats = trim_lib.EPSILON,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    refit: bool = False,
    gram_norm: str = "none",
    proxy_gram: float = 0.0,
    no_gram: str = "mean",
    grams: jax.Array | None = None,
    targets: jax.Array | None = None,
    name: str | None = None,
) -> jax.Array:
    """Least-squares coefficients of the trimmed task vectors: `sum_s lambda_s D'_s` `[out, in]`.

    `deltas` `[T, ...]` are trimmed by `trim` to `densities` (`trim=None` with
    densities 1: no trim), then masked by TIES' sign election when
    `sign_election` is "sum" or "count". `targets` `[T, ...]`: the task vectors
    the merge must reproduce (default: `deltas` before the trim; `merge_planned`
    passes the untrimmed stack after trimming itself). `grams` `[in, in]` or
    `[T, in, in]` (default: `calib.hessian`): without them, or for tensors that
    are not 2-D, the result is the weighted mean (`no_gram="sum"`: sum) of the trimmed vectors.
    `gram_norm` / `proxy_gram`: the Grams balanced and augmented first (`gram_balance`).
    """
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard)
    tasks = x.shape[0]
    w = _checks.per_task_values(weights, tasks, "weights", name, guard)
    if sign_election not in SIGN_ELECTION:
        raise ValueError(f"unknown sign_election {sign_election!r}; known: {', '.join(SIGN_ELECTION)}")
    check_options(gram_norm, proxy_gram, name, guard, no_gram)
    opts = TrimOptions(key, calib, gamma, epsilon, blocksize, percdamp, refit)
    x, tgt, trimmed = _fit_stack(x, targets, densities, trim, rescale, count, opts, name, guard)
    if sign_election != "none":
        weighted = trimmed * combine.broadcast_weights(jnp.asarray(w, x.dtype), trimmed.ndim)
        mask = elect.agreement_mask(weighted, elect.elect_sign(weighted, sign_election))
        trimmed = trimmed * mask.astype(x.dtype)
    if grams is None and calib is not None:
        grams = calib.hessian
    if grams is None or x.ndim != 3:
        return guard.apply(without_gram(trimmed, w, no_gram, name, guard))
    grams = _fit_grams(grams, tgt, gram_norm, proxy_gram, name)
    lam = lstsq_coefficients(trimmed, tgt, grams, w, name=name)
    return guard.apply(jnp.einsum("s,soi->oi", lam, trimmed, precision=_HP))


def regularised_gram_sum(grams: jax.Array, weights: jax.Array, alpha: float) -> jax.Array:
    """`sum_t w_t G~_t` `[in, in]` from `[T, in, in]`: the matrix RegMean inverts (same dead-input rule)."""
    diag = jnp.diagonal(grams, axis1=-2, axis2=-1)
    eye = jnp.eye(grams.shape[-1], dtype=grams.dtype)
    g = alpha * grams + (1.0 - alpha) * diag[:, :, None] * eye
    g = g + jnp.all(diag == 0, axis=0).astype(grams.dtype) * eye  # inputs no task sees: weighted mean
    return jnp.einsum("t,tij->ij", weights, g, precision=_HP)


def regmean_trim(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    trim: str | None = "magnitude",
    rescale: bool | None = None,
    count: str = "round",
    alpha: float = 0.9,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = trim_lib.GAMMA,
    epsilon: Floats = trim_lib.EPSILON,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    refit: bool = False,
    gram_norm: str = "none",
    proxy_gram: float = 0.0,
    no_gram: str = "mean",
    grams: jax.Array | None = None,
    targets: jax.Array | None = None,
    name: str | None = None,
) -> jax.Array:
    """RegMean on trimmed task vectors: `(sum_t w_t D'_t G~_t)(sum_t w_t G~_t)^-1` `[out, in]`.

    `trim="sparsegpt"` gives RegMean on OBS-trimmed deltas (each `D'_t`
    reproduces its own task's outputs, the combine is RegMean's closed form).
    `grams` default to `calib.hessian`; without them the weighted mean.
    `gram_norm` / `proxy_gram` balance and augment the Grams first (`gram_balance`) for
    `targets` `[T, out, in]`, the untrimmed task vectors (default: `deltas` before the trim).
    """
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard)
    check_options(gram_norm, proxy_gram, name, guard, no_gram)
    opts = TrimOptions(key, calib, gamma, epsilon, blocksize, percdamp, refit)
    x, tgt, trimmed = _fit_stack(x, targets, densities, trim, rescale, count, opts, name, guard)
    if grams is None and calib is not None:
        grams = calib.hessian
    if grams is not None and x.ndim == 3:
        grams = _fit_grams(grams, tgt, gram_norm, proxy_gram, name)
    return guard.apply(regmean(trimmed, weights, grams=grams, alpha=alpha, no_gram=no_gram, name=name))


def regmean_sparse(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    trim: str | None = "magnitude",
    rescale: bool | None = None,
    count: str = "round",
    alpha: float = 0.9,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = trim_lib.GAMMA,
    epsilon: Floats = trim_lib.EPSILON,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    refit: bool = False,
    gram_norm: str = "none",
    proxy_gram: float = 0.0,
    no_gram: str = "mean",
    grams: jax.Array | None = None,
    name: str | None = None,
) -> jax.Array:
    """One sparse merged task vector: RegMean's dense optimum trimmed to the mean density `[out, in]`.

    The untrimmed `deltas` `[T, out, in]` are merged by RegMean (`grams` or
    `calib.hessian`), then `trim` applies to that one vector at
    `mean(densities)`; calibration trims (sparsegpt, wanda) read
    `S = sum_t w_t G~_t`, the metric of the merge objective around its optimum.
    Without Grams: the weighted mean (`no_gram="sum"`: sum), trimmed (sparsegpt then refused).
    `gram_norm` / `proxy_gram`: both the fit and `S` read the balanced, augmented Grams.
    """
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard)
    check_options(gram_norm, proxy_gram, name, guard, no_gram)
    tasks = x.shape[0]
    dt = _checks.work_dtype(x.dtype)
    x = x.astype(dt)
    w = _checks.per_task_values(weights, tasks, "weights", name, guard)
    dens = _checks.densities_values(densities, tasks, name, guard)
    if grams is None and calib is not None:
        grams = calib.hessian
    if grams is None or x.ndim != 3:
        grams = None
    else:
        grams = _fit_grams(grams, x, gram_norm, proxy_gram, name)
    merged = regmean(x, w, grams=grams, alpha=alpha, no_gram=no_gram, name=name)
    stats = None
    if grams is not None:
        g = _stacked_grams(grams, tasks, x.shape[-1], dt, name)
        stats = Calibration(hessian=regularised_gram_sum(g, jnp.asarray(w, dt), alpha))
    gam = _checks.per_task_values(gamma, tasks, "gamma", name, guard)
    eps = _checks.per_task_values(epsilon, tasks, "epsilon", name, guard)
    opts = TrimOptions(key, stats, _mean(gam), _mean(eps), blocksize, percdamp, refit)
    out = _trim_inputs(merged[None], _mean(dens), trim, rescale, count, name, guard, opts)
    return guard.apply(out[0])


def _mean(values: tuple[float, ...] | jax.Array) -> float | jax.Array:
    """The mean of per-task values: a Python float when known (as always), else in the program.

    Traced: `v_0 + mean(v - v_0)`, exactly `v_0` when the tasks share one value (a
    plain float32 mean of three equal densities is one ulp off a third of the time,
    which moves `round(density * n)` off the eager count at half-integers).
    Unequal traced values agree with the eager float64 mean to float32 rounding.
    """
    if isinstance(values, tuple):
        return float(sum(values) / len(values))
    return values[0] + jnp.mean(values - values[0])
