"""Core Space merging as mergekit's unmerged `core_space` pull request defines it (commit 94c2baf, 2025-11).

Panariello et al., NeurIPS 2025, applied to full task vectors. For each 2-D
task vector `tau_t` `[out, in]`: its rank-`r` truncated SVD `B_t A_t` (`B_t =
U[:, :r]`, `A_t = diag(S[:r]) Vt[:r]`, `r = max(1, min(16, min(out, in) // 4))`);
reference bases `U_B` (left singular vectors of `[B_1 ... B_T]`) and `V_A`
(right singular vectors of `[A_1; ...; A_T]`), both cut to their common
width `c`; core matrices `U_B^T B_t A_t V_A` averaged with equal weights,
times the one global `weight`; result `U_B (weight * mean core) V_A^T`.
Other tensors (1-D, where the branch's SVD fails and it falls back): `weight
* mean_t tau_t`.

The per-model weights a config gives must all be equal: that value is the
pull request's global `weight` (default 1.0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge.methods import Floats


def core_rank(shape: tuple[int, int]) -> int:
    """The pull request's rank of each task vector's SVD for a `[out, in]` tensor."""
    return max(1, min(16, min(shape) // 4))


def core_space(deltas: jax.Array, weights: Floats = 1.0, *, name: str | None = None) -> jax.Array:
    """Core Space merge of `deltas` `[T, ...]` -> task vector `[...]` (module doc); `weights` all equal."""
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    x = x.astype(_checks.work_dtype(x.dtype))
    tasks = x.shape[0]
    w = jnp.asarray(_checks.per_task_values(weights, tasks, "weights", name, guard), x.dtype)
    guard.require(
        jnp.all(w == w[0]),
        f"core_space has one global weight: give every model the same weight{_checks.where(name)}",
    )
    if x.ndim != 3:
        return guard.apply(w[0] * jnp.mean(x, axis=0))
    out, inn = x.shape[1:]
    r = core_rank((out, inn))
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)  # batched over the tasks
    b = u[:, :, :r]  # [T, out, r]
    a = s[:, :r, None] * vt[:, :r, :]  # [T, r, in]
    u_b = jnp.linalg.svd(jnp.swapaxes(b, 0, 1).reshape(out, tasks * r), full_matrices=False)[0]
    v_a = jnp.linalg.svd(a.reshape(tasks * r, inn), full_matrices=False)[2].T
    c = min(u_b.shape[1], v_a.shape[1])
    u_b, v_a = u_b[:, :c], v_a[:, :c]
    core = jnp.mean(jnp.einsum("oc,tor,tri,id->tcd", u_b, b, a, v_a), axis=0)
    return guard.apply(u_b @ (w[0] * core) @ v_a.T)
