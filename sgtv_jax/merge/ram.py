"""RAM and RAM+ tensor-local (mergekit's `ram` and `ramplus_tl`, Reinforced Agent Merging, arXiv 2601.13572).

`deltas` `[T, ...]` -> merged task vector `[...]` (`theta_0 + result` is the
merged tensor). An entry of task vector t *contributes* where `|tau_t| >
epsilon`; `count` is how many tasks contribute to it. An entry only one task
contributes to keeps that task's value; an entry several contribute to takes
their mean; the others stay at the base. mergekit gives these methods no
per-model weight (weights other than 1 are refused here).

RAM+ (tensor-local) scales each task's unique entries by `lambda_t = 1 + r *
clip(rho_t, 0, alpha)`, `rho_t = shared_t / max(unique_t, epsilon)` with
`shared_t` / `unique_t` the numbers of task t's contributing entries that
others share / that only it has, counted over the whole tensor (so RAM+ is
not entry-wise; RAM is).

Traced arguments (`jit`, `vmap`): the tensors, `threshold` (`epsilon`), `r`, `alpha`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge.interpolation import unit_weights
from sgtv_jax.merge.methods import Floats

RAM_EPSILON = 1e-5
"""mergekit's default `epsilon` of both methods: the |change| above which an entry contributes."""


def _contributions(
    deltas: jax.Array, weights: Floats, epsilon: float | jax.Array, method: str, name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array, _checks.Guard]:
    """(task vectors `[T, ...]` zeroed where they do not contribute, their mask, its count `[...]`, guard)."""
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    x = x.astype(_checks.work_dtype(x.dtype))
    unit_weights(weights, x.shape[0], method, name, guard)
    eps = jnp.asarray(epsilon, x.dtype)
    guard.require(jnp.isfinite(eps) & (eps >= 0), f"{method} epsilon must be a finite number >= 0{_checks.where(name)}")
    nz = jnp.abs(x) > eps
    return jnp.where(nz, x, 0), nz, jnp.sum(nz, axis=0), guard


def ram(
    deltas: jax.Array, weights: Floats = 1.0, *, threshold: float | jax.Array = RAM_EPSILON, name: str | None = None
) -> jax.Array:
    """RAM: `sum_t tau_t [|tau_t| > epsilon] / max(count, 1)`, deltas `[T, ...]` -> `[...]`.

    `threshold` is mergekit's `epsilon` (a config's `parameters.epsilon`; the
    keyword differs from DELLA's per-model `epsilon`).
    """
    x, _, count, guard = _contributions(deltas, weights, threshold, "ram", name)
    return guard.apply(jnp.sum(x, axis=0) / jnp.maximum(count, 1).astype(x.dtype))


def ramplus_tl(
    deltas: jax.Array,
    weights: Floats = 1.0,
    *,
    r: float | jax.Array = 0.1,
    alpha: float | jax.Array = 0.2,
    threshold: float | jax.Array = RAM_EPSILON,
    name: str | None = None,
) -> jax.Array:
    """RAM+ tensor-local: RAM with each task's unique entries scaled by `1 + r clip(rho_t, 0, alpha)`.

    deltas `[T, ...]` -> `[...]`; `rho_t` counts over the whole tensor (module doc);
    `threshold`: mergekit's `epsilon`, as in `ram`.
    """
    x, nz, count, guard = _contributions(deltas, weights, threshold, "ramplus_tl", name)
    tasks = x.shape[0]
    unique = count == 1
    shared = (nz & (count > 1)).reshape(tasks, -1).sum(axis=1).astype(x.dtype)
    own = (nz & unique).reshape(tasks, -1).sum(axis=1).astype(x.dtype)
    rho = shared / jnp.maximum(own, jnp.asarray(threshold, x.dtype))
    lam = 1 + jnp.asarray(r, x.dtype) * jnp.clip(rho, 0, jnp.asarray(alpha, x.dtype))
    lam = lam.reshape((tasks,) + (1,) * (x.ndim - 1))
    scaled = jnp.where(unique, x * lam, x / jnp.maximum(count, 1).astype(x.dtype))
    return guard.apply(jnp.sum(scaled, axis=0))
