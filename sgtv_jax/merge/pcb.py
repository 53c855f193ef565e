"""PCB merging (Parameter Competition Balancing) as mergekit's `pcb` branch defines it (commit 9577efc, 2024).

Not in mergekit's registry (the branch was never merged, and its class has
no `name()`), so a config cannot name it (`specs.REFUSED`); this is the
library function, with that branch's exact rule and defaults. For task
vectors `tau` `[n, N]` (each flattened):

- `b_intra_i = softmax(n * tau_i^2 / max(|tau_i^2|_2, 1e-12))` (over the N entries)
- `b_inter_i = sum_j softmax((tau_i tau_j) / max(|tau_i tau_j|_2, 1e-12))`
- `b = b_intra * b_inter`; per task keep the `k = int(N * density)` largest
  (ties: the lower index; torch's `topk` leaves them unspecified)
- `result = weight * sum_i tau_i * b_hat_i / sum(b_hat)`, one sum over every
  task and entry (the branch's normalisation: the weights of all entries of
  all tasks add up to 1). When `k == 0` the branch divides 0 by 0 (NaN); here
  the result is zero (no change).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks

NORMALIZE_EPS = 1e-12
"""`torch.nn.functional.normalize`'s floor of the norm."""


def _normalize(x: jax.Array) -> jax.Array:
    """Rows of `x` `[..., N]` divided by their L2 norm (at least 1e-12), as `F.normalize(x, dim=-1)`."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORMALIZE_EPS)


def balance(tau: jax.Array) -> jax.Array:
    """The balancing scores `b` `[n, N]` of flattened task vectors `tau` `[n, N]`."""
    n = tau.shape[0]
    intra = jax.nn.softmax(n * _normalize(tau * tau), axis=-1)
    pair = _normalize(tau[:, None, :] * tau[None, :, :])  # [i, j, N]
    inter = jnp.sum(jax.nn.softmax(pair, axis=-1), axis=1)
    return intra * inter


def pcb(
    deltas: jax.Array,
    weights: float | jax.Array = 1.0,
    *,
    density: float,
    name: str | None = None,
) -> jax.Array:
    """PCB merge of `deltas` `[n, ...]` -> task vector `[...]`; `weights`: the branch's one global `weight`.

    `density` (required in the branch) is static: it sets how many entries are kept.
    """
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    x = x.astype(_checks.work_dtype(x.dtype))
    d = _checks.check_density(density)
    tasks = x.shape[0]
    flat = x.reshape(tasks, -1)
    b = balance(flat)
    k = int(flat.shape[1] * d)  # the branch's int(N * density)
    _, idx = jax.lax.top_k(b, k)  # ties: the lower index first
    keep = jnp.zeros_like(b, dtype=bool).at[jnp.arange(tasks)[:, None], idx].set(True)
    b_hat = jnp.where(keep, b, 0)
    if k == 0:  # the branch divides 0 by 0 (NaN everywhere); nothing kept means no change here
        return guard.apply(jnp.zeros(x.shape[1:], x.dtype))
    out = jnp.sum(flat * (b_hat / jnp.sum(b_hat)), axis=0)
    return guard.apply(jnp.asarray(weights, x.dtype) * out.reshape(x.shape[1:]))
