"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025): data-free, one SVD per task vector.

For each 2-D task vector `tau_t` `[out, in]` (rank `r = min(out, in)`), its
`k = r // T` leading singular triplets `U_t[:, :k]`, `s_t[:k]`, `V_t[:, :k]`
are kept (the paper's `1/T` share of the spectrum per task); the kept left
vectors of all tasks are put side by side, `U = [U_1^k ... U_T^k]`
`[out, T k]`, the right ones likewise `V` `[in, T k]`, the singular values in
the same order `S = diag(s_1^k, ..., s_T^k)`. The bases of different tasks
overlap (their interference), so each is replaced by its nearest matrix with
orthonormal columns (the orthogonal Procrustes / polar factor: `U = P D Q^T`
-> `P Q^T`), and the merged task vector is

    alpha * polar(U) S polar(V)^T.

Reference followed: the authors' code (github.com/AntoAndGar/task_singular_vectors,
`compute_and_sum_svd_mem_reduction`, the same in danielm1405/iso-merging's
`src/utils/TSVM_utils.py` and FusionBench's `TaskSingularVectorMerging`).
Choices, each the reference's unless said:

- tensors that are not 2-D (norms, biases) get `alpha * mean_t w_t tau_t`,
  the papers' average;
- per-model weights scale the task vectors before the SVDs (`tau_t -> w_t
  tau_t`: FusionBench's per-model alpha list); `alpha` (default 1.0,
  FusionBench's; the papers pick it on validation data in (0, 3]) scales the
  whole result, as the papers apply their coefficient to the merged vector;
- `k = r // T` exactly (the reference computes `int(r * (1 / T))`, the same up
  to float rounding), but at least 1: where `r < T` the reference keeps no
  component and drops the layer's update; here each task keeps its leading one;
- 2-D tensors reach the method as the pipeline orients them (linear layers
  `[out, in]`, the embedding in its `[hidden, vocab]` view); TSV-M is
  transpose-equivariant, so the orientation does not change the result.

SVDs run in float32 (float64 for float64 input); products at HIGHEST precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge import combine
from sgtv_jax.merge.methods import Floats

_HP = jax.lax.Precision.HIGHEST


def polar(a: jax.Array) -> jax.Array:
    """The nearest matrix to `a` `[..., m, n]` with orthonormal columns (rows when `m < n`): `P Q^T` of `a = P D Q^T`."""
    p, _, qt = jnp.linalg.svd(a, full_matrices=False)
    return jnp.matmul(p, qt, precision=_HP)


def weighted_stack(
    deltas: jax.Array, weights: Floats, alpha: float | jax.Array, method: str, name: str | None
) -> tuple[_checks.Guard, jax.Array]:
    """The checked task vectors `[T, ...]`, each times its weight, in the working dtype; the guard of the checks.

    `alpha` must be >= 0 (checked by the guard when traced).
    """
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    w = _checks.per_task_values(weights, x.shape[0], "weights", name, guard)
    if _checks.is_traced(alpha):
        guard.require(alpha >= 0, f"{method} alpha must be >= 0{_checks.where(name)}")
    elif not float(alpha) >= 0:
        raise ValueError(f"{method} alpha must be >= 0, got {alpha!r}{_checks.where(name)}")
    dt = _checks.work_dtype(x.dtype)
    return guard, x.astype(dt) * combine.broadcast_weights(jnp.asarray(w, dt), x.ndim)


def mean_fallback(x: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """`alpha * mean_t x_t` of `[T, ...]`: the papers' rule for tensors that are not 2-D."""
    return jnp.asarray(alpha, x.dtype) * combine.sum_tasks(x) / x.shape[0]


def tsv_rank(rank: int, tasks: int) -> int:
    """Singular components kept per task: `rank // tasks`, at least 1."""
    return max(1, rank // tasks)


def tsv(deltas: jax.Array, weights: Floats = 1.0, *, alpha: float = 1.0, name: str | None = None) -> jax.Array:
    """TSV-M merge of `deltas` `[T, out, in]` -> task vector `[out, in]` (module doc); other shapes averaged.

    `weights` `[T]` scale the task vectors before their SVDs; `alpha` (>= 0, may be traced) scales the
    result. Returns float32 (float64 for float64 input). Jit- and vmap-able.
    """
    guard, x = weighted_stack(deltas, weights, alpha, "tsv", name)
    if x.ndim != 3:
        return guard.apply(mean_fallback(x, alpha))
    tasks, out, inn = x.shape
    k = tsv_rank(min(out, inn), tasks)
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)  # batched over the tasks
    u_cat = jnp.swapaxes(u[:, :, :k], 0, 1).reshape(out, tasks * k)  # task-major columns
    s_cat = s[:, :k].reshape(tasks * k)
    vt_cat = vt[:, :k, :].reshape(tasks * k, inn)
    merged = jnp.matmul(polar(u_cat) * s_cat, polar(vt_cat), precision=_HP)
    return guard.apply(jnp.asarray(alpha, x.dtype) * merged)
