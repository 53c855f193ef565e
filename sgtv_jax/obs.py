"""Blockwise Optimal-Brain-Surgeon pruning of task vectors (SparseGPT's sweep).

For a task vector `D` `[rows, cols]` and the layer Hessian `H` `[cols, cols]`,
find a sparse `D'` minimising `||(D - D') X||^2`, compensating every pruned
entry with the entries still to be processed. Semantics:

* columns in blocks of `blocksize`; unstructured: at each block start score
  `W1^2 / diag(U1)^2` and prune exactly `k = round((1 - density) * rows * width)`
  lowest scores, ties in row-major order; N:M: per row, `prunen` of every
  `prunem` columns, chosen lazily from the in-block-updated weights;
* per column: `err = (w - q) / U_ii`, `W1[:, i:] -= err U[i, i:]`,
  loss `+= (w - q)^2 / U_ii^2 / 2`; after the block `W[:, i2:] -= Err1 U[i1:i2, i2:]`.

Everything after input validation is one jit-compiled XLA program per
(shapes, blocksize, N:M) - densities and damping are traced, so changing them
does not recompile. The sweep itself is `sgtv_jax.sweep` (every task sharing
the factor in one `[cols, T * rows]` problem; the block loop unrolled at trace
time, so every lazy update is an exact-size matmul).

`obs_prune` itself composes with `jit`, `vmap` and `grad`: `density` and
`percdamp` may be traced arrays (the per-block counts are then computed in the
program, equal to the host's, `traced_block_prune_counts`); `blocksize`,
`prunen`, `prunem`, `refit`, `refit_maxiter` are static. Shape and dtype
errors are raised while tracing; value errors (NaN / Inf, density range,
asymmetric or indefinite H, percdamp) are raised at once for concrete inputs
and are `checkify` user checks under tracing, with a NaN result when checkify
is not used (`sgtv_jax._checks.Guard`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax import _checks
from sgtv_jax.counts import exact_round
from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.factor import (
    MAX_ESCALATIONS,
    InverseFactor,
    compute_dtype,
    damped_hessian,
    factor_from_inverse,
    factor_unchecked,
)
from sgtv_jax.refit import refit_kept
from sgtv_jax.select import smallest_mask
from sgtv_jax.sweep import sweep as blockwise_sweep

if TYPE_CHECKING:  # shape annotations for readers and type checkers; never evaluated at run time
    from jaxtyping import Array, Bool, Float, Int


class ObsInfo(NamedTuple):
    """What `obs_prune(..., return_info=True)` reports besides the pruned delta.

    loss: OBS loss of the sweep, scalar or `[T]`.
    percdamp: relative damping finally used (after escalation), scalar or `[T]`.
    """

    loss: Float[Array, "*tasks"]
    percdamp: Float[Array, "*tasks"]


# --------------------------------------------------------------------------- masks


def prune_k_smallest(scores: Float[Array, " n"], k: Int[Array, ""]) -> Bool[Array, " n"]:
    """Bool mask of the `k` smallest of `scores` `[n]` (>= 0), ties in index order.

    Exact radix select over the float bit patterns (`sgtv_jax.select`): a few
    histogram passes instead of a full sort; `k` may be traced.
    """
    return smallest_mask(scores, k)


@functools.partial(jax.jit, static_argnames=("blocksize", "prunen", "prunem"))
def obs_sweep(
    delta: Float[Array, "tasks rows cols"],
    factor: InverseFactor,
    prune_counts: Int[Array, "tasks nblocks"],
    *,
    blocksize: int = BLOCKSIZE,
    prunen: int = 0,
    prunem: int = 0,
) -> tuple[Float[Array, "tasks rows cols"], Bool[Array, "tasks rows cols"], Float[Array, " tasks"]]:
    """The pure, compiled sweep on a precomputed factor (no validation).

    Args:
      delta: `[T, rows, cols]` task vectors.
      factor: from `inverse_factor`, shared (`upper` `[cols, cols]`) or per task
        (`upper` `[T, cols, cols]`). Dead columns of `delta` are zeroed here.
      prune_counts: int32 `[T, nblocks]`, entries to prune per block
        (`block_prune_counts`); ignored for N:M.
    Returns:
      (pruned `[T, rows, cols]` in the compute dtype, pruned-entry mask, loss `[T]`).
    """
    w = delta.astype(compute_dtype(delta.dtype))
    w = jnp.where(factor.dead[..., None, :], 0, w)
    u = factor.upper.astype(w.dtype)
    sweep = functools.partial(blockwise_sweep, blocksize=blocksize, prunen=prunen, prunem=prunem)
    if u.ndim == 3:
        q, m, loss = jax.vmap(lambda wt, ut, ct: sweep(wt[None], ut, ct[None]))(w, u, prune_counts)
        return q[:, 0], m[:, 0], loss[:, 0]
    return sweep(w, u, prune_counts)


def block_prune_counts(
    densities: Sequence[float], rows: int, cols: int, blocksize: int
) -> Int[np.ndarray, "tasks nblocks"]:
    """`round((1 - density) * rows * width)` per task and block, int32 `[T, nblocks]`.

    Computed on the host in float64 with Python's round so the counts are the
    same on every backend. `traced_block_prune_counts` gives the same integers
    for densities that are traced arrays.
    """
    widths = [min(blocksize, cols - i1) for i1 in range(0, cols, blocksize)]
    return np.array([[round((1.0 - d) * rows * w) for w in widths] for d in densities], dtype=np.int32)


def traced_block_prune_counts(
    densities: Float[Array, " tasks"], rows: int, cols: int, blocksize: int
) -> Int[Array, "tasks nblocks"]:
    """`block_prune_counts` for densities `[T]` that may be traced (inside jit / vmap).

    The same integers as the host computation for the same (float64-widened)
    values, bit for bit, with or without x64 (`sgtv_jax.counts.exact_round`).
    """
    widths = [min(blocksize, cols - i1) for i1 in range(0, cols, blocksize)]
    per_width = {w: exact_round(densities, (rows, w), complement=True) for w in set(widths)}
    return jnp.stack([per_width[w] for w in widths], axis=-1)


# --------------------------------------------------------------------------- public API


def _validate(delta, hessian, density, prunen, prunem, blocksize, hessian_name, guard):
    """Shapes and dtypes raise now (also under tracing); values go through `guard`."""
    delta = _checks.as_array(delta, "delta")
    hessian = _checks.as_array(hessian, hessian_name)
    if delta.ndim not in (2, 3):
        raise ValueError(f"delta must be [rows, cols] or [T, rows, cols], got shape {delta.shape}")
    if not jnp.issubdtype(delta.dtype, jnp.floating):
        raise ValueError(f"delta must be floating point, got {delta.dtype}")
    if delta.ndim == 3 and delta.shape[0] == 0:
        raise ValueError(f"delta is an empty stack (shape {delta.shape}): no task vectors to prune")
    if 0 in delta.shape:
        raise ValueError(f"delta has an empty dimension (shape {delta.shape}): nothing to prune")
    cols = delta.shape[-1]
    tasks = delta.shape[0] if delta.ndim == 3 else 1
    shared_shape, stacked_shape = (cols, cols), (tasks, cols, cols)
    if hessian.shape != shared_shape and not (delta.ndim == 3 and hessian.shape == stacked_shape):
        allowed = f"{shared_shape}" + (f" or {stacked_shape}" if delta.ndim == 3 else "")
        raise ValueError(
            f"{hessian_name} must have shape {allowed} for delta of shape {delta.shape}, got {hessian.shape}"
        )
    blocksize = _checks.check_positive_int(blocksize, "blocksize")
    densities: tuple[float, ...] | jax.Array
    if prunen or prunem:
        if density is not None:
            raise ValueError("give either density (unstructured) or prunen/prunem (N:M), not both")
        if not (0 < int(prunen) < int(prunem)):
            raise ValueError(f"N:M pruning needs 0 < prunen < prunem, got prunen={prunen}, prunem={prunem}")
        if blocksize % prunem:
            raise ValueError(f"blocksize ({blocksize}) must be a multiple of prunem ({prunem})")
        if cols % prunem:
            raise ValueError(f"the number of columns ({cols}) must be a multiple of prunem ({prunem})")
        densities = (1.0 - prunen / prunem,) * tasks
    else:
        densities = _checks.density_values(density, tasks, guard)
    guard.finite(delta, "delta (task vector)")
    guard.finite(hessian, hessian_name)
    _checks.check_symmetric(hessian, hessian_name, guard)
    return delta, hessian, densities, int(prunen), int(prunem), blocksize


def _run(delta, factor, densities, prunen, prunem, blocksize, name, guard, refit=None):
    """Shared tail of the public entry points: sweep, optional refit, edge cases, dtype, errors.

    densities: Python floats (known now: host counts, density-1 shortcut) or a
    traced `[T]` array (exact traced counts; density 1 selected afterwards).
    refit: None, or (hessian, tol, maxiter) to refit the kept entries (`refit.py`).
    """
    squeeze = delta.ndim == 2
    stack = delta[None] if squeeze else delta
    tasks, rows, cols = stack.shape
    where = f" for {name}" if name else ""
    guard.require(
        factor.ok,
        lambda: (
            f"Hessian{where} is not positive definite even after raising the damping "
            f"to percdamp={float(jnp.max(factor.percdamp)):.3g}; check the calibration inputs"
        ),
        f"Hessian{where} is not positive definite even after raising the damping "
        f"{MAX_ESCALATIONS} times by x10; check the calibration inputs",
    )
    known = isinstance(densities, tuple)
    if known and all(d == 1.0 for d in densities) and not prunen:
        return delta, jnp.zeros(() if squeeze else (tasks,), compute_dtype(delta.dtype)), factor.percdamp
    if known:
        counts = jnp.asarray(block_prune_counts(densities, rows, cols, blocksize))
        keep_input = jnp.asarray([d == 1.0 and not prunen for d in densities])
    else:
        counts = traced_block_prune_counts(densities, rows, cols, blocksize)
        keep_input = densities == 1.0
    pruned, mask, loss = obs_sweep(stack, factor, counts, blocksize=blocksize, prunen=prunen, prunem=prunem)
    if refit is not None:
        hessian, tol, maxiter = refit
        target = jnp.where(factor.dead[..., None, :], 0, stack.astype(pruned.dtype))
        a = damped_hessian(hessian, factor.percdamp)
        pruned, _ = refit_kept(target, pruned, ~mask, a, tol=tol, maxiter=maxiter)
    pruned = jnp.where(keep_input[:, None, None], stack, pruned).astype(delta.dtype)
    loss = jnp.where(keep_input, 0, loss)
    return (pruned[0], loss[0], factor.percdamp) if squeeze else (pruned, loss, factor.percdamp)


@overload
def obs_prune(
    delta: Float[Any, "*tasks rows cols"],
    hessian: Float[Any, "*per_task cols cols"],
    *,
    density: float | Sequence[float] | None = ...,
    prunen: int = ...,
    prunem: int = ...,
    blocksize: int = ...,
    percdamp: float = ...,
    refit: bool = ...,
    refit_tol: float = ...,
    refit_maxiter: int = ...,
    name: str | None = ...,
    return_info: Literal[False] = ...,
) -> tuple[Float[Array, "*tasks rows cols"], Float[Array, "*tasks"]]: ...


@overload
def obs_prune(
    delta: Float[Any, "*tasks rows cols"],
    hessian: Float[Any, "*per_task cols cols"],
    *,
    density: float | Sequence[float] | None = ...,
    prunen: int = ...,
    prunem: int = ...,
    blocksize: int = ...,
    percdamp: float = ...,
    refit: bool = ...,
    refit_tol: float = ...,
    refit_maxiter: int = ...,
    name: str | None = ...,
    return_info: Literal[True],
) -> tuple[Float[Array, "*tasks rows cols"], ObsInfo]: ...


def obs_prune(
    delta: Float[Any, "*tasks rows cols"],
    hessian: Float[Any, "*per_task cols cols"],
    *,
    density: float | Sequence[float] | None = None,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    refit: bool = False,
    refit_tol: float = 1e-4,
    refit_maxiter: int = 20,
    name: str | None = None,
    return_info: bool = False,
) -> tuple[Float[Array, "*tasks rows cols"], Float[Array, "*tasks"]] | tuple[Float[Array, "*tasks rows cols"], ObsInfo]:
    """Prune task vector(s) with blockwise OBS error correction.

    Args:
      delta: `[rows, cols]` (PyTorch layout: out x in features) or a stack
        `[T, rows, cols]`; NumPy, JAX or torch arrays.
      hessian: `[cols, cols]` (shared by every task: factored once, one batched
        sweep) or `[T, cols, cols]` (one per task); symmetric to sqrt(eps) of
        its largest entry (else ValueError naming it).
      density: fraction of entries kept, in [0, 1]; a float or one per task.
      prunen, prunem: N:M semi-structured pruning instead of `density`.
      blocksize: columns per block (a multiple of `prunem` for N:M).
      percdamp: relative damping, a finite number >= 0; raised x10 up to 5
        times if H is indefinite.
      refit: then solve the least-squares values of the kept entries for the
        final mask (`refit.py`, masked CG from the OBS values); the mask is kept.
      refit_tol, refit_maxiter: CG stopping rule (relative residual, iteration cap).
      name: layer name used in error messages.
      return_info: return an `ObsInfo` (loss and the damping used) instead of the loss.
    Returns:
      (pruned delta, same shape and dtype; OBS loss of the sweep, scalar or `[T]`), or
      (pruned delta, `ObsInfo`) with `return_info=True`.
    """
    guard = _checks.Guard()
    delta, hessian, densities, prunen, prunem, blocksize = _validate(
        delta, hessian, density, prunen, prunem, blocksize, "hessian", guard
    )
    _checks.check_percdamp(percdamp, guard)
    factor = factor_unchecked(hessian, percdamp)
    tol = refit_tol if _checks.is_traced(refit_tol) else float(refit_tol)
    refit_args = (hessian, tol, int(refit_maxiter)) if refit else None
    pruned, loss, damping = guard.apply(
        _run(delta, factor, densities, prunen, prunem, blocksize, name, guard, refit_args)
    )
    return (pruned, ObsInfo(loss, damping)) if return_info else (pruned, loss)


def obs_prune_from_inverse(
    delta: Float[Any, "*tasks rows cols"],
    hessian_inv: Float[Any, "*per_task cols cols"],
    *,
    density: float | Sequence[float] | None = None,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = BLOCKSIZE,
    name: str | None = None,
) -> tuple[Float[Array, "*tasks rows cols"], Float[Array, "*tasks"]]:
    """`obs_prune` from a precomputed full inverse Hessian `[cols, cols]` (already damped).

    No dead-column handling or damping can be applied to an inverse; prefer
    `obs_prune` with the Hessian itself.
    """
    guard = _checks.Guard()
    delta, hessian_inv, densities, prunen, prunem, blocksize = _validate(
        delta, hessian_inv, density, prunen, prunem, blocksize, "hessian_inv", guard
    )
    if hessian_inv.ndim == 3:
        factor = jax.vmap(factor_from_inverse)(hessian_inv)
    else:
        factor = factor_from_inverse(hessian_inv)
    where = f" for {name}" if name else ""
    guard.require(factor.ok, f"hessian_inv{where} is not positive definite (its Cholesky failed)")
    return guard.apply(_run(delta, factor, densities, prunen, prunem, blocksize, name, guard)[:2])
