"""RegMean (Jin et al. 2023): the closed-form least-squares merge of linear layers.

For a linear layer `y = W x` (PyTorch layout, `W` `[out, in]`) and per-task Gram
matrices of its inputs `G_t` `[in, in]`, RegMean solves
`min_W sum_t ||W X_t - W_t X_t||^2`:

    W* = (sum_t W_t G_t) (sum_t G_t)^-1
       = W_0 + (sum_t tau_t G~_t) (sum_t G~_t)^-1

with `G~_t = alpha G_t + (1 - alpha) diag(G_t)` (off-diagonals scaled by
`alpha`, the paper's regularisation). We also weight each task:
`G~_t -> w_t G~_t` (weights 1 give the paper's formula).

The Grams are the Hessians of the OBS core (`sgtv_jax.hessian`, `H = (2/n) X X^T`
per calibration sequence); their scale cancels when every task's Gram has the
same scale. `hessian_finalize` averages over sequences, so each task counts
equally whatever its number of calibration sequences; the paper's raw sums
weight tasks by their token counts (multiply `H_t` by `n_t / 2` to get that).

`gram_norm` / `proxy_gram` first replace each `G_t` by its balanced,
task-vector-augmented Gram (`sgtv_jax.merge.gram_balance`: each task at one
scale, plus `beta` times WUDI's proxy `D_t^T D_t / ||D_t||^2`); "none" / 0
(the defaults) leave the Grams as given.

Inputs no task ever sees (a zero diagonal in every `G_t`) decouple from the
solve; there the merge is the weighted mean of the task vectors' columns.
Tensors that are not 2-D, or that have no Gram, are merged by the weighted
mean `sum_t w_t tau_t / sum_t w_t` (the paper averages all non-linear
parameters), or with `no_gram="sum"` by the weighted sum `sum_t w_t tau_t`
(`gram_balance.without_gram`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge import combine
from sgtv_jax.merge.gram_balance import augmented_grams, check_options, without_gram


def regmean(
    deltas: jax.Array,
    weights: float | Sequence[float] | jax.Array = 1.0,
    *,
    grams: Any = None,
    alpha: float = 0.9,
    gram_norm: str = "none",
    proxy_gram: float = 0.0,
    no_gram: str = "mean",
    name: str | None = None,
) -> jax.Array:
    """Merged task vector `[out, in]` from `deltas` `[T, out, in]` and `grams`.

    Args:
      deltas: task vectors `[T, out, in]` (any shape when `grams` is None).
      weights: per-task weights `[T]` (default 1 each).
      grams: `[in, in]` (shared: RegMean then reduces to the weighted mean) or
        `[T, in, in]`; None -> weighted mean.
      alpha: scale of the off-diagonal Gram entries, in [0, 1] (default 0.9;
        the paper tunes it; 1 is plain least squares).
      gram_norm, proxy_gram: balance each task's Gram and add its task vector's proxy
        Gram before the fit (`sgtv_jax.merge.gram_balance`; "none" / 0: the paper's).
      no_gram: "mean" (the paper's) or "sum": how tensors without a Gram combine (`gram_balance`).
    Returns: `(sum_t w_t tau_t G~_t)(sum_t w_t G~_t)^-1`, float32 (float64 for f64 input).
    """
    guard = _checks.Guard()
    deltas = _checks.stack(deltas, name, guard=guard)
    tasks = deltas.shape[0]
    w = _checks.per_task_values(weights, tasks, "weights", name, guard)
    if not _checks.is_traced(alpha):
        if not (0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"regmean alpha must be in [0, 1], got {alpha!r}")
    else:
        guard.require((alpha >= 0) & (alpha <= 1), "regmean alpha must be in [0, 1]")
    check_options(gram_norm, proxy_gram, name, guard, no_gram)
    dt = _checks.work_dtype(deltas.dtype)
    x = deltas.astype(dt)
    if grams is None or x.ndim != 3:
        return guard.apply(without_gram(x, w, no_gram, name, guard))
    wa = jnp.asarray(w, dt)
    g = jnp.asarray(grams).astype(dt)
    cols = x.shape[-1]
    if g.shape not in ((cols, cols), (tasks, cols, cols)):
        raise ValueError(
            f"regmean grams must have shape {(cols, cols)} or {(tasks, cols, cols)} for task "
            f"vectors of shape {tuple(x.shape)}, got {tuple(g.shape)}{_checks.where(name)}"
        )
    guard.require(jnp.all(jnp.isfinite(g)), f"regmean grams contain NaN or Inf{_checks.where(name)}")
    _checks.check_symmetric(g, f"regmean grams{_checks.where(name)}", guard)
    if g.ndim == 2:
        g = jnp.broadcast_to(g, (tasks, cols, cols))
    g = augmented_grams(g, x, gram_norm, proxy_gram)  # the Grams themselves for "none" / 0
    diag = jnp.diagonal(g, axis1=-2, axis2=-1)  # [T, cols]
    eye = jnp.eye(cols, dtype=dt)
    g = alpha * g + (1.0 - alpha) * diag[:, :, None] * eye
    dead = jnp.all(diag == 0, axis=0)  # [cols]
    g = g + dead.astype(dt) * eye  # decoupled columns: weighted mean
    gw = g * combine.broadcast_weights(wa, 3)
    hp = jax.lax.Precision.HIGHEST
    numer = jnp.einsum("tri,tij->rj", x, gw, precision=hp)  # [out, in]
    denom = combine.sum_tasks(gw)  # [in, in], symmetric
    merged = jnp.linalg.solve(denom, numer.T).T
    guard.require(
        jnp.all(jnp.isfinite(merged)),
        f"regmean: the summed Gram matrix is singular{_checks.where(name)}; use alpha < 1 or more calibration data",
    )
    return guard.apply(merged)
