"""Exact least-squares refit of the entries OBS kept (OBS + refit).

SparseGPT's sweep picks the mask and compensates greedily: a processed column
is never revisited. For the mask it ends with, the best kept values solve, per
output row r with kept set S,

    min ||(D[r] - D'[r]) X||^2  s.t. D'[r, ~S] = 0   =>   D'[r, S] = A_SS^-1 (A D[r]^T)_S

with `A` the sweep's damped Hessian. Instead of one solve per row we run a
Jacobi-preconditioned conjugate gradient on all rows (and tasks) at once,
started from the OBS values: each iteration is one `[rows, cols] x [cols, cols]`
product, shapes are fixed, and rows converge independently (a converged row is
frozen). Entries outside the mask are never touched, so the mask is kept exactly.
CG from the OBS point lowers the damped objective monotonically.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # shape annotations for readers and type checkers; never evaluated at run time
    from jaxtyping import Array, Bool, Float, Int

HIGHEST = jax.lax.Precision.HIGHEST


def _refit_rows(
    delta: Float[Array, "rows cols"],
    values: Float[Array, "rows cols"],
    keep: Bool[Array, "rows cols"],
    a: Float[Array, "cols cols"],
    tol: float | Float[Array, ""],
    maxiter: int,
) -> tuple[Float[Array, "rows cols"], Int[Array, ""]]:
    """delta, values, keep: `[rows, cols]`; a: `[cols, cols]` (SPD). Returns (values, iterations)."""
    keep = keep.astype(delta.dtype)
    precond = keep / jnp.diagonal(a)  # Jacobi, restricted to the kept entries

    def matvec(p):
        return keep * jnp.matmul(p, a, precision=HIGHEST)

    values = keep * values
    r = keep * jnp.matmul(delta - values, a, precision=HIGHEST)  # -gradient / 2
    z = precond * r
    rz = jnp.sum(r * z, axis=-1)
    stop = (tol**2) * rz  # relative to each row's starting residual

    def cond(carry):
        i, _, _, _, _, rz = carry
        return jnp.logical_and(i < maxiter, jnp.any(rz > stop))

    def body(carry):
        i, v, r, p, z, rz = carry
        active = rz > stop
        ap = matvec(p)
        pap = jnp.sum(p * ap, axis=-1)
        alpha = jnp.where(active & (pap > 0), rz / jnp.where(pap > 0, pap, 1), 0)
        v = v + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        z = precond * r
        rz_new = jnp.sum(r * z, axis=-1)
        beta = jnp.where(active & (rz > 0), rz_new / jnp.where(rz > 0, rz, 1), 0)
        p = z + beta[:, None] * p
        return i + 1, v, r, p, z, jnp.where(active, rz_new, rz)

    i, values, *_ = jax.lax.while_loop(cond, body, (jnp.int32(0), values, r, z, z, rz))
    return values, i


@functools.partial(jax.jit, static_argnames=("maxiter",))
def refit_kept(
    delta: Float[Array, "tasks rows cols"],
    values: Float[Array, "tasks rows cols"],
    keep: Bool[Array, "tasks rows cols"],
    damped_hessian: Float[Array, "*per_task cols cols"],
    *,
    tol: float | Float[Array, ""] = 1e-4,
    maxiter: int = 20,
) -> tuple[Float[Array, "tasks rows cols"], Int[Array, "*per_task"]]:
    """Least-squares values for the kept entries of pruned task vectors.

    Args:
      delta: original task vectors `[T, rows, cols]` (dead columns zeroed).
      values: starting point `[T, rows, cols]` (the OBS result).
      keep: bool `[T, rows, cols]`, the entries that may be nonzero.
      damped_hessian: `[cols, cols]` shared or `[T, cols, cols]`, the matrix the
        sweep factored (`factor.damped_hessian`).
      tol: stop a row when its preconditioned residual falls below `tol` times
        its starting one.
      maxiter: iteration cap (static).
    Returns:
      (refitted `[T, rows, cols]`, zero outside `keep`; iterations run, `[T]` or scalar).
    """
    dtype = values.dtype
    a = damped_hessian.astype(dtype)
    delta = delta.astype(dtype)
    if a.ndim == 3:
        return jax.vmap(lambda d, v, k, at: _refit_rows(d, v, k, at, tol, maxiter))(delta, values, keep, a)
    tasks, rows, cols = values.shape

    def flat(x):
        return x.reshape(tasks * rows, cols)

    out, iters = _refit_rows(flat(delta), flat(values), flat(keep), a, tol, maxiter)
    return out.reshape(values.shape), iters
