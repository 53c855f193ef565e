"""SCE (Wan et al. 2024, "FuseChat"): select by variance, calculate weights, erase sign conflicts.

mergekit's `sce` on task vectors `deltas` `[T, ...]` -> merged task vector `[...]`
(`theta_0 + result` is the merged tensor), after an optional trim of each task
vector (`trim`: any of `sgtv_jax.merge.trim.TRIMS`, e.g. "sparsegpt"; mergekit has
none), which composes as it does with TIES.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.merge import combine, elect
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.methods import Floats, TrimOptions, resolve_rescale
from sgtv_jax.merge.trim import Calibration


def select_mask(deltas: jax.Array, select_topk: float | jax.Array) -> jax.Array:
    """`[...]` bool: the `int(nonzero * select_topk)` entries of largest variance across tasks.

    Variance is the population variance over the T task vectors; `nonzero`
    counts entries with non-zero variance, and the product is taken in float32
    as mergekit's torch code computes it. Ties in variance: the earlier entry.
    `select_topk <= 0` selects nothing, `>= 1` everything.
    """
    var = jnp.var(deltas, axis=0)
    flat = var.reshape(-1)
    nonzero = jnp.sum(flat != 0).astype(jnp.float32)
    k = jnp.floor(nonzero * jnp.asarray(select_topk, jnp.float32)).astype(jnp.int32)
    k = jnp.clip(k, 0, flat.size)
    kept = trim_lib.top_mask(jnp.abs(flat), k).reshape(var.shape)
    sk = jnp.asarray(select_topk)
    return jnp.where(sk >= 1, True, jnp.where(sk <= 0, False, kept))


def sce_weights(deltas: jax.Array) -> jax.Array:
    """`[T]`: `mean(tau_t^2)` normalised to sum 1 (equal weights when the sum is below 1e-6, as mergekit)."""
    ms = jnp.mean(jnp.square(deltas.reshape(deltas.shape[0], -1)), axis=1)
    total = jnp.sum(ms)
    small = jnp.abs(total) < 1e-6
    return jnp.where(small, 1.0 / deltas.shape[0], ms / jnp.where(small, 1, total))


def sce(
    deltas: jax.Array,
    weights: Floats = 1.0,
    densities: Floats = 1.0,
    *,
    select_topk: float = 1.0,
    trim: str | None = None,
    rescale: bool | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = trim_lib.GAMMA,
    epsilon: Floats = trim_lib.EPSILON,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """SCE: `sum_t c_t m_t tau'_t / max(sum_t c_t m_t, 1e-6)`.

    1. (ours) `trim` each task vector to `densities[t]` first, if given;
    2. select: zero the entries outside `select_mask(tau, select_topk)` in every task;
    3. calculate: `c_t = w_t * sce_weights(tau')_t` (weights 1: mergekit's SCE,
       which has no per-model weight);
    4. erase: `m_t = [sign(tau'_t) == sign(sum_t tau'_t)]` (ties elect +, zeros never agree).
    Defaults: select_topk 1 (no selection), no trim, rescale off.
    """
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    tasks = x.shape[0]
    w = _checks.per_task_values(weights, tasks, "weights", name, guard)
    dens = _checks.densities_values(densities, tasks, name, guard)
    if not _checks.is_traced(select_topk):
        if not 0.0 <= float(select_topk) <= 1.0:
            raise ValueError(f"select_topk must be in [0, 1], got {select_topk!r}{_checks.where(name)}")
    else:
        sk = jnp.asarray(select_topk)
        guard.require((sk >= 0) & (sk <= 1), f"select_topk must be in [0, 1]{_checks.where(name)}")
    x = x.astype(_checks.work_dtype(x.dtype))
    rescale = resolve_rescale(rescale, False, trim)
    if trim is not None:
        opts = TrimOptions(key, calib, gamma, epsilon, blocksize, percdamp, refit)
        x = opts.trim(trim, x, dens, rescale=rescale, count=count, name=name)
    else:
        _no_trim_args(dens, rescale, count, guard, name)
    if _checks.is_traced(select_topk) or float(select_topk) < 1.0:
        x = x * select_mask(x, select_topk)[None]
    elected = elect.elect_sign(x, "sum")
    agree = elect.agreement_mask(x, elected).astype(x.dtype)
    c = sce_weights(x) * jnp.asarray(w, x.dtype)
    c = c.reshape((-1,) + (1,) * (x.ndim - 1)) * agree
    merged = combine.sum_tasks(x * c) / jnp.maximum(combine.sum_tasks(c), 1e-6)
    return guard.apply(merged)


def _no_trim_args(
    dens: Sequence[float] | jax.Array, rescale: bool, count: str, guard: _checks.Guard, name: str | None
) -> None:
    if isinstance(dens, tuple):
        if any(d != 1.0 for d in dens):
            raise ValueError(
                f"densities {list(dens)} given but no trim{_checks.where(name)}; pass trim=... "
                f"(one of {', '.join(trim_lib.TRIMS)})"
            )
    else:
        guard.require(jnp.all(dens == 1.0), "densities given but no trim; pass trim=...")
    if rescale:
        raise ValueError(f"rescale=True needs a trim{_checks.where(name)}")
    if count != "round":
        raise ValueError(f"count={count!r} sets how a trim counts entries, but no trim is given{_checks.where(name)}")
