"""Isotropic merging (Marczak et al., ICML 2025, "No Task Left Behind"): Iso-C and Iso-CTS, data-free.

Iso-C: the task-arithmetic sum `M = sum_t w_t tau_t` `[out, in]` with its
spectrum made flat. With `M = U diag(s) V^T` (thin SVD, `r = min(out, in)`
singular values),

    iso_c = alpha * mean(s) U V^T,

every direction of the sum's row and column spaces gets the same gain, so the
few dominant directions (shared by the tasks) no longer drown the weak ones
(one task's own).

Iso-CTS: the sum's top `c` singular directions are the common subspace; the
remaining `r - c` directions are given to the tasks, `n = (r - c) / T` each:
each task vector with the common left directions projected out, `tau_t -
U_c U_c^T tau_t`, gives its own top `n` singular triplets. The `T n` task
directions and the `c` common ones are put side by side (`[out, r]`, `[in,
r]`), each basis replaced by its polar factor (orthonormal columns, as in
TSV-M), and the spectrum made flat with the mean of all `r` kept singular
values:

    iso_cts = alpha * mean(s_kept) polar(U_kept) polar(V_kept)^T.

The split, as the reference computes it: `c0 = floor(r * common_space_fraction)`,
`n = round((r - c0) / T)` (Python's round, halves to even), `c = r - T n`, so
`c + T n = r`. With `common_space_fraction = 1` (or one task) Iso-CTS is Iso-C.

Reference followed: the authors' code (github.com/danielm1405/iso-merging,
`src/utils/iso.py`, commit d34010a; FusionBench's `ISO_C_Merge` /
`ISO_CTS_Merge` match it). Choices, each the reference's unless said:

- tensors that are not 2-D (norms, biases) get `alpha * mean_t w_t tau_t`;
- per-model weights scale the task vectors (`tau_t -> w_t tau_t`); `alpha`
  (default 1.0, FusionBench's `scaling_factor`; the paper picks it on
  validation data in (0, 3]) scales the whole result;
- `common_space_fraction` default 0.8 (the paper's and both codes');
- `n` is capped at `r // T` so that `c >= 0` (the reference would slice
  with a negative `c` for a small fraction, e.g. `r = 5`, `T = 3`, fraction 0);
- the projection removes the common *left* (output-side) directions, as the
  paper writes it for a `[out, in]` weight; 2-D tensors reach the method as
  the pipeline orients them (linear layers as stored, the embedding in its
  `[hidden, vocab]` view, so its output side is the hidden size too).
  Iso-C does not depend on the orientation.

SVDs run in float32 (float64 for float64 input); products at HIGHEST precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge import combine
from sgtv_jax.merge.methods import Floats
from sgtv_jax.merge.tsv import mean_fallback, polar, weighted_stack

_HP = jax.lax.Precision.HIGHEST


def iso_c(deltas: jax.Array, weights: Floats = 1.0, *, alpha: float = 1.0, name: str | None = None) -> jax.Array:
    """Iso-C merge of `deltas` `[T, out, in]` -> `alpha * mean(s) U V^T` of their weighted sum `[out, in]`.

    Tensors that are not 2-D: `alpha` times the weighted mean. `alpha` >= 0 may be traced. Returns float32
    (float64 for float64 input). Jit- and vmap-able.
    """
    guard, x = weighted_stack(deltas, weights, alpha, "iso_c", name)
    if x.ndim != 3:
        return guard.apply(mean_fallback(x, alpha))
    u, s, vt = jnp.linalg.svd(combine.sum_tasks(x), full_matrices=False)
    scale = jnp.asarray(alpha, x.dtype) * jnp.mean(s)
    return guard.apply(scale * jnp.matmul(u, vt, precision=_HP))


def iso_split(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """`(c, n)`: the common subspace's size and each task's, `c + tasks * n == rank` (module doc)."""
    c0 = int(rank * fraction)
    n = min(round((rank - c0) / tasks), rank // tasks)
    return rank - tasks * n, n


def iso_cts(
    deltas: jax.Array,
    weights: Floats = 1.0,
    *,
    alpha: float = 1.0,
    common_space_fraction: float = 0.8,
    name: str | None = None,
) -> jax.Array:
    """Iso-CTS merge of `deltas` `[T, out, in]` -> task vector `[out, in]` (module doc); other shapes averaged.

    `common_space_fraction` in [0, 1] is static (it sets the shapes); `weights` `[T]` and `alpha` (>= 0,
    may be traced) as in `iso_c`. Returns float32 (float64 for float64 input). Jit- and vmap-able.
    """
    guard, x = weighted_stack(deltas, weights, alpha, "iso_cts", name)
    frac = common_space_fraction
    if _checks.is_traced(frac) or isinstance(frac, bool) or not 0.0 <= float(frac) <= 1.0:
        raise ValueError(
            f"iso_cts common_space_fraction must be a number in [0, 1] (not traced), got {frac!r}{_checks.where(name)}"
        )
    if x.ndim != 3:
        return guard.apply(mean_fallback(x, alpha))
    tasks, out, inn = x.shape
    c, n = iso_split(min(out, inn), tasks, float(frac))
    u, s, vt = jnp.linalg.svd(combine.sum_tasks(x), full_matrices=False)
    uc = u[:, :c]
    own = x - jnp.einsum("oc,pc,tpi->toi", uc, uc, x, precision=_HP)  # common left directions removed
    ut, st, vtt = jnp.linalg.svd(own, full_matrices=False)  # batched over the tasks
    u_kept = jnp.concatenate([jnp.swapaxes(ut[:, :, :n], 0, 1).reshape(out, tasks * n), uc], axis=1)
    s_kept = jnp.concatenate([st[:, :n].reshape(tasks * n), s[:c]])
    vt_kept = jnp.concatenate([vtt[:, :n, :].reshape(tasks * n, inn), vt[:c]], axis=0)
    scale = jnp.asarray(alpha, x.dtype) * jnp.mean(s_kept)
    return guard.apply(scale * jnp.matmul(polar(u_kept), polar(vt_kept), precision=_HP))
