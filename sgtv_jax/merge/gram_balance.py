"""Balanced and task-vector-augmented Grams for the Hessian fits (`regmean`, `regmean_trim`, `regmean_sparse`, `lstsq`).

The Hessian fits minimise `sum_t w_t ||(M - D_t) X_t||^2 = sum_t w_t tr((M - D_t) G_t (M - D_t)^T)`
(task vectors `D_t` `[out, in]`, Grams `G_t = X_t X_t^T` `[in, in]`). A task
whose Gram is 100x the others' (longer or louder calibration text) then
decides the merge alone. Two options change the Grams before the fit:

* `gram_norm`: each task's Gram divided by a normaliser `c_t`:
  `none` (`c_t = 1`, RegMean as published), `trace` (`c_t = tr(G_t) / in`,
  the mean diagonal: every task's inputs get one scale) or `energy`
  (`c_t = ||D_t X_t||^2 = tr(D_t G_t D_t^T)`, the task vector's output
  energy: each task's residual term becomes scale-free, a relative error).
  A normaliser of 0 (a task without data; for `energy` also a task vector
  that is zero on its inputs) leaves that Gram at 0: the task drops out
  of the data term, never a NaN.
* `proxy_gram: beta`: add `beta` times each task's proxy Gram
  `P_t = D_t^T D_t / ||D_t||_F^2` (WUDI's, `wudi.proxy_grams`: the task
  vector's rows stand in for its inputs), normalised by the same rule
  (`P_t / c_t(P_t)`), so `G'_t = G_t / c_t(G_t) + beta P_t / c_t(P_t)`.
  `beta = 0` is the data fit; `beta -> inf` is WUDI's closed form (RegMean
  on the proxies alone). A task without data then fits its proxy alone.

Tensors without a Gram (norms, biases: not 2-D, or no calibration) have no
fit; `no_gram` says how they combine: `mean`, `sum_t w_t tau_t / sum_t w_t`
(RegMean's rule: the paper averages all non-linear parameters), or `sum`,
`sum_t w_t tau_t` (task arithmetic). A mean keeps a third of each of three
tasks' norm changes; on `examples/merge_quality.py` (seed 0) the sum lifted
RegMean's addition from 0.87 to 0.92 of its specialist with the other tasks
kept (docs/methods.md).

The augmented Grams go through each fit as its Grams always do (RegMean's
`alpha` regularisation, the weights `w_t`, `regmean_sparse`'s OBS metric
`sum_t w_t G~'_t`). `none` with `beta = 0` returns the Grams untouched, so
today's merges stay bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge import combine
from sgtv_jax.merge.wudi import proxy_grams

GRAM_NORMS = ("none", "trace", "energy")
"""The `gram_norm` rules: no normaliser, the mean diagonal, the task vector's output energy."""

NO_GRAM = ("mean", "sum")
"""The `no_gram` rules for tensors without a Gram: the weighted mean (RegMean's), the weighted sum."""

_HP = jax.lax.Precision.HIGHEST


def check_options(
    gram_norm: str, proxy_gram: float | jax.Array, name: str | None, guard: _checks.Guard, no_gram: str = "mean"
) -> None:
    """ValueError for an unknown `gram_norm` / `no_gram` or a `proxy_gram` < 0 (traced: through `guard`)."""
    if gram_norm not in GRAM_NORMS:
        raise ValueError(f"unknown gram_norm {gram_norm!r}; known: {', '.join(GRAM_NORMS)}{_checks.where(name)}")
    if no_gram not in NO_GRAM:
        raise ValueError(f"unknown no_gram {no_gram!r}; known: {', '.join(NO_GRAM)}{_checks.where(name)}")
    if _checks.is_traced(proxy_gram):
        guard.require(proxy_gram >= 0, f"proxy_gram must be >= 0{_checks.where(name)}")
    elif not float(proxy_gram) >= 0:
        raise ValueError(f"proxy_gram must be a number >= 0, got {proxy_gram!r}{_checks.where(name)}")


def gram_scales(grams: jax.Array, deltas: jax.Array, mode: str) -> jax.Array:
    """Each task's normaliser `c_t` `[T]` of `grams` `[T, in, in]` under `mode`, 0 where there is none.

    `trace`: `tr(G_t) / in`; `energy`: `tr(D_t G_t D_t^T)` with `deltas` `[T, out, in]`
    (an energy below float rounding of its bound `tr(G_t) ||D_t||^2` counts as 0).
    """
    tr = jnp.trace(grams, axis1=-2, axis2=-1)
    if mode == "trace":
        return jnp.where(tr > 0, tr / grams.shape[-1], 0.0)
    if mode != "energy":
        raise ValueError(f"gram_scales has no normaliser for gram_norm {mode!r}")
    dg = jnp.einsum("toi,tij->toj", deltas, grams, precision=_HP)
    energy = jnp.sum(dg * deltas, axis=(1, 2))
    bound = tr * jnp.sum(deltas * deltas, axis=(1, 2))
    return jnp.where(energy > jnp.finfo(grams.dtype).eps * bound, energy, 0.0)


def balance_grams(grams: jax.Array, deltas: jax.Array, mode: str) -> jax.Array:
    """`G_t / c_t` `[T, in, in]` from `grams` `[T, in, in]` and `deltas` `[T, out, in]`; `none`: `grams` itself.

    A task whose normaliser is 0 keeps a zero Gram (no NaN).
    """
    if mode == "none":
        return grams
    c = gram_scales(grams, deltas, mode)
    inv = jnp.where(c > 0, 1.0 / jnp.where(c > 0, c, 1.0), 0.0)
    return grams * inv[:, None, None].astype(grams.dtype)


def augmented_grams(
    grams: jax.Array, deltas: jax.Array, gram_norm: str = "none", proxy_gram: float | jax.Array = 0.0
) -> jax.Array:
    """`balance(G_t) + beta * balance(P_t)` `[T, in, in]` (`P_t` WUDI's proxy Gram of `deltas[t]`).

    grams: `[T, in, in]` (a task without data: zeros); deltas: `[T, out, in]`, the
    task vectors the fit reproduces (untrimmed). `none` with a known `beta = 0`
    returns `grams` itself.
    """
    g = balance_grams(grams, deltas, gram_norm)
    if not _checks.is_traced(proxy_gram) and float(proxy_gram) == 0.0:
        return g
    p = balance_grams(proxy_grams(deltas.astype(grams.dtype)), deltas.astype(grams.dtype), gram_norm)
    return g + jnp.asarray(proxy_gram, grams.dtype) * p


def without_gram(
    x: jax.Array, w: tuple[float, ...] | jax.Array, no_gram: str, name: str | None, guard: _checks.Guard
) -> jax.Array:
    """A tensor without a Gram `[...]` from its task vectors `x` `[T, ...]` and weights `w` `[T]`.

    `mean`: `sum_t w_t x_t / sum_t w_t` (a zero weight sum is refused; NaN when traced);
    `sum`: `sum_t w_t x_t`. The caller applies `guard` to its result.
    """
    wa = jnp.asarray(w, x.dtype)
    if no_gram == "sum":
        return combine.weighted_sum(x, wa)
    # known weights: summed in Python (float64) as always; traced: in the program
    ok = abs(sum(w)) >= 1e-12 if isinstance(w, tuple) else jnp.abs(jnp.sum(w)) >= 1e-12
    guard.require(
        ok,
        lambda: f"the weighted mean needs weights that do not sum to 0, got {list(w)}{_checks.where(name)}",
        f"the weighted mean needs weights that do not sum to 0{_checks.where(name)}",
    )
    return combine.weighted_sum(x, wa, normalize=True)
