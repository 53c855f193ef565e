"""CABS (Conflict-Aware N:M Sparsification) as mergekit's unmerged `cabs` pull request defines it (915219a, 2025-05).

Not in mergekit's registry, and its per-model `n_val` / `m_val` and global
`pruning_order` have no place in this config format yet, so a config cannot
name it (`specs.REFUSED`); this is the library function with the pull
request's rule. The models are taken in the order of `deltas` (the pull
request's `pruning_order`, else its models sorted by path). For each model t
in turn:

- `candidate = tau_t` with the entries already retained by earlier models zeroed;
- N:M prune of the candidate over its flattened entries: blocks of `m`
  consecutive entries (the last padded with zeros), the `n` largest `|value|`
  of each block retained (ties: the lower index; the pull request's
  `torch.topk` leaves them unspecified). A retained entry may be zero (an
  entry an earlier model took): it is still marked retained;
- `result += w_t * pruned`; the retained mask joins the cumulative one.

Per-model `n` / `m` default to the pull request's fallback 1:4. Where the
pull request logs an invalid `n`/`m` and keeps the task vector whole, this
raises ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge.methods import Floats

FALLBACK_N, FALLBACK_M = 1, 4
"""The pull request's N:M when neither the model nor the config gives one."""


def nm_mask(x: jax.Array, n: int, m: int) -> jax.Array:
    """Retained mask `[...]` of the N:M prune of `x` `[...]` over its flattened entries (module doc)."""
    size = x.size
    if n == 0:
        return jnp.zeros(x.shape, bool)
    if n == m:
        return jnp.ones(x.shape, bool)
    pad = (m - size % m) % m
    blocks = jnp.concatenate([jnp.abs(x).reshape(-1), jnp.zeros(pad, x.dtype)]).reshape(-1, m)
    _, idx = jax.lax.top_k(blocks, n)  # ties: the lower index first
    keep = jnp.zeros(blocks.shape, bool).at[jnp.arange(blocks.shape[0])[:, None], idx].set(True)
    return keep.reshape(-1)[:size].reshape(x.shape)


def _per_task(value: int | Sequence[int], tasks: int, what: str) -> tuple[int, ...]:
    vals = tuple(value) if isinstance(value, Sequence) else (value,) * tasks
    if len(vals) != tasks or any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
        raise ValueError(f"cabs {what} must be an integer or one per model ({tasks}), got {value!r}")
    return vals


def cabs(
    deltas: jax.Array,
    weights: Floats = 1.0,
    *,
    n: int | Sequence[int] = FALLBACK_N,
    m: int | Sequence[int] = FALLBACK_M,
    name: str | None = None,
) -> jax.Array:
    """CABS merge of `deltas` `[T, ...]` (in pruning order) -> task vector `[...]`; `n`, `m` static, per model."""
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    x = x.astype(_checks.work_dtype(x.dtype))
    tasks = x.shape[0]
    ns, ms = _per_task(n, tasks, "n"), _per_task(m, tasks, "m")
    for nn, mm in zip(ns, ms):
        if not (0 <= nn <= mm and mm > 0):
            raise ValueError(f"cabs needs 0 <= n <= m and m > 0, got n={nn}, m={mm}{_checks.where(name)}")
    w = jnp.asarray(_checks.per_task_values(weights, tasks, "weights", name, guard), x.dtype)
    out = jnp.zeros(x.shape[1:], x.dtype)
    taken = jnp.zeros(x.shape[1:], bool)
    for t in range(tasks):
        candidate = jnp.where(taken, 0, x[t])
        keep = nm_mask(candidate, ns[t], ms[t])
        out = out + w[t] * jnp.where(keep, candidate, 0)
        taken = taken | keep
    return guard.apply(out)
