"""The blockwise OBS column sweep (SparseGPT's), on a precomputed inverse factor.

Layout: the stack `[T, rows, cols]` is swept as one transposed problem
`[cols, T * rows]`: a column of every task is one contiguous vector and every
task sharing the factor goes through each operation together; only the exact
per-block prune count (`smallest_mask`, ties in each task's row-major order)
is per task. Three levels:

* leaf (`LEAF` columns): the sequential column recursion, a `fori_loop` of
  rank-1 updates on `[LEAF, T * rows]` (contiguous rows, no per-column copy);
* block (`blocksize` columns, the unit of the exact-k cut): one matmul per
  leaf carries its errors to the rest of the block;
* across blocks: SparseGPT's lazy update, grouped recursively (the first half
  of the blocks is swept, its errors reach the second half in one matmul,
  then the second half is swept), so the products are as square as the shape
  allows instead of `[rows, blocksize] x [blocksize, n]` slivers.

Each entry's arithmetic is the column-by-column sweep's (`err = w / U_ii` per
pruned entry, `w_j -= err * U_ij`); the cross-leaf and cross-block sums are
grouped into matmuls differently, so float32 results differ from a
block-by-block sweep in the last bits (masks agree with the float64 oracle:
tests/core/test_obs.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from sgtv_jax.select import smallest_mask_rows

if TYPE_CHECKING:  # shape annotations for readers and type checkers; never evaluated at run time
    from jaxtyping import Array, Bool, Float, Int

HIGHEST = jax.lax.Precision.HIGHEST
# Columns per leaf (see module docstring); tuned on CPU.
LEAF = 16


def nm_mask(w: Float[Array, "m n"], d: Float[Array, " m"], prunen: int) -> Bool[Array, "m n"]:
    """N:M group mask along axis 0: per column of `w` `[m, N]`, the `prunen` lowest `w^2/d^2`, stable."""
    scores = w**2 / d[:, None] ** 2
    ranks = jnp.argsort(jnp.argsort(scores, axis=0, stable=True), axis=0)
    return ranks < prunen


def _leaf(
    carry: tuple[Array, Array, Array], u: Float[Array, "L L"], d: Float[Array, " L"], prunen: int, prunem: int
) -> tuple[Array, Array, Array]:
    """Column-by-column OBS over the leaf columns `w` `[L, N]` with mask `m` (filled here for N:M).

    u `[L, L]` (the leaf's block of U), d `[L]` its diagonal. A loop over columns; the
    transposed layout makes each column a contiguous `[N]` vector. Returns (w, m, err).
    """
    width = u.shape[0]

    def error(i, w, m):
        """(column i's error `[N]`, the mask, its N:M group chosen when i starts one)."""
        if prunem:
            start = i // prunem * prunem
            group = jax.lax.dynamic_slice_in_dim(w, start, prunem)
            fresh = nm_mask(group, jax.lax.dynamic_slice_in_dim(d, start, prunem), prunen)
            m = jnp.where(i % prunem == 0, jax.lax.dynamic_update_slice_in_dim(m, fresh, start, 0), m)
        return jnp.where(m[i], w[i], 0) / d[i], m

    def column(i, carry):
        # e (column i's error) comes computed from the previous step: were it computed
        # here, XLA would fuse it into both of its consumers, reading w twice and
        # copying the whole leaf every column.
        w, m, err, e = carry
        # u[i, :i] is exactly 0, so a full-width rank-1 update is exact and keeps the shapes fixed.
        w = w - u[i][:, None] * e[None, :]
        err = err.at[i].set(e)
        e, m = error(jnp.minimum(i + 1, width - 1), w, m)
        return w, m, err, e

    w, m, err = carry
    e, m = error(0, w, m)
    w, m, err, _ = jax.lax.fori_loop(0, width, column, (w, m, err, e))
    return w, m, err


def _leaf_width(count: int, prunem: int) -> int:
    """Columns per leaf: a multiple of `prunem` (N:M groups never straddle leaves) dividing `count`."""
    size = max(LEAF // max(prunem, 1), 1) * max(prunem, 1)
    return size if count % size == 0 and size < count else count


def sweep_block(
    w1: Float[Array, "B N"], u1: Float[Array, "B B"], mask1: Bool[Array, "B N"] | None, prunen: int, prunem: int
) -> tuple[Array, Array, Array]:
    """OBS over one block `[B, N]` (transposed). Returns (q1, pruned mask, err1), `[B, N]` each."""
    count = w1.shape[0]
    leaf = _leaf_width(count, prunem)
    d = jnp.diagonal(u1)
    mask1 = jnp.zeros(w1.shape, bool) if mask1 is None else mask1

    def panel(p, carry):
        w1, mask1, q1, err1 = carry
        j = p * leaf
        piece = (jax.lax.dynamic_slice_in_dim(w1, j, leaf), jax.lax.dynamic_slice_in_dim(mask1, j, leaf))
        us = jax.lax.dynamic_slice(u1, (j, j), (leaf, leaf))
        w, m, err = _leaf(
            (*piece, jnp.zeros_like(piece[0])), us, jax.lax.dynamic_slice_in_dim(d, j, leaf), prunen, prunem
        )
        # Column i ends at w - e * U_ii == q up to rounding; pruned entries are exact 0.
        q1 = jax.lax.dynamic_update_slice_in_dim(q1, jnp.where(m, 0, w), j, 0)
        mask1 = jax.lax.dynamic_update_slice_in_dim(mask1, m, j, 0)
        err1 = jax.lax.dynamic_update_slice_in_dim(err1, err, j, 0)
        # Carry this leaf's errors to the rest of the block. Columns of U left of the
        # leaf are 0; the leaf's own columns are already stored in q1.
        u_rows = jax.lax.dynamic_slice_in_dim(u1, j, leaf, 0)
        w1 = w1 - jnp.matmul(u_rows.T, err, precision=HIGHEST)
        return w1, mask1, q1, err1

    carry = (w1, mask1, jnp.zeros_like(w1), jnp.zeros_like(w1))
    _, mask1, q1, err1 = jax.lax.fori_loop(0, count // leaf, panel, carry)
    return q1, mask1, err1


def _block_mask(
    w1: Float[Array, "B N"], u1: Float[Array, "B B"], counts: Int[Array, " T"], tasks: int
) -> Bool[Array, "B N"]:
    """Unstructured prune mask of a block `[B, N]`: per task, the exact-k lowest `w^2/d^2`, ties row-major."""
    width, n = w1.shape
    rows = n // tasks
    scores = w1**2 / jnp.diagonal(u1)[:, None] ** 2
    per_task = scores.reshape(width, tasks, rows).transpose(1, 2, 0).reshape(tasks, rows * width)
    mask = smallest_mask_rows(per_task, counts)
    return mask.reshape(tasks, rows, width).transpose(2, 0, 1).reshape(width, n)


def sweep(
    w: Float[Array, "tasks rows cols"],
    u: Float[Array, "cols cols"],
    prune_counts: Int[Array, "tasks nblocks"],
    blocksize: int,
    prunen: int,
    prunem: int,
) -> tuple[Float[Array, "tasks rows cols"], Bool[Array, "tasks rows cols"], Float[Array, " tasks"]]:
    """OBS sweep of a stack sharing one factor.

    w `[T, rows, cols]`, u `[cols, cols]`, prune_counts int `[T, nblocks]`.
    Returns pruned `[T, rows, cols]`, pruned-entry mask, loss `[T]`.
    """
    tasks, rows, cols = w.shape
    wt = w.transpose(2, 0, 1).reshape(cols, tasks * rows)
    starts = list(range(0, cols, blocksize))

    def blocks(wt, lo, hi):
        """Sweep blocks lo..hi-1 of `wt` (their columns); returns (q, mask, err) of those columns."""
        if hi - lo == 1:
            i1, i2 = starts[lo], min(starts[lo] + blocksize, cols)
            u1 = u[i1:i2, i1:i2]
            mask1 = None if prunem else _block_mask(wt, u1, prune_counts[:, lo], tasks)
            return sweep_block(wt, u1, mask1, prunen, prunem)
        mid = (lo + hi) // 2
        c0, c1 = starts[lo], starts[mid]
        left = blocks(wt[: c1 - c0], lo, mid)
        # The left half's errors reach every later column in one matmul (SparseGPT's lazy
        # update, grouped recursively so the products are as square as the shape allows).
        c2 = min(starts[hi - 1] + blocksize, cols)
        right = wt[c1 - c0 :] - jnp.matmul(u[c0:c1, c1:c2].T, left[2], precision=HIGHEST)
        return tuple(jnp.concatenate(pair) for pair in zip(left, blocks(right, mid, hi), strict=True))

    q, mask, err = (x.reshape(cols, tasks, rows).transpose(1, 2, 0) for x in blocks(wt, 0, len(starts)))
    return q, mask, jnp.sum(err**2, axis=(1, 2)) / 2
