"""Trimming (sparsifying) task vectors: which entries of each task vector survive.

Every trim keeps a fraction `density` of one task vector and zeros the rest;
`density == 1` returns the input unchanged and `density == 0` returns zeros.
Counts are `k = round(density * n)` by default; `count="floor"` takes
mergekit's `int(density * n)` instead (truncation, which can lose an entry to
float error, e.g. `int(0.29 * 100) == 28`). Ties in score are broken by stable
row-major order (the earlier entry is kept); mergekit ranks with torch's
unstable `argsort`, whose order among equal scores is unspecified.

| trim          | scope           | rule                                                       |
| ------------- | --------------- | ---------------------------------------------------------- |
| `magnitude`   | whole tensor    | keep the `k` largest `|d|`                                  |
| `random`      | each entry      | keep with probability `density` (DARE; `jax.random`)       |
| `magprune`    | each row        | keep with p linear in the `|d|` rank: density -/+ epsilon  |
| `breadcrumbs` | whole tensor    | drop the top `round(gamma*n)` `|d|`, keep the next `k`     |
| `wanda`       | each output row | keep the `round(density*cols)` largest `|d_ij| * ||x_j||`  |
| `sparsegpt`   | OBS blocks      | `sgtv_jax.obs.obs_prune`: prune + compensate kept entries  |

`rescale` multiplies the survivors by `1/density` (`1/p` per entry for
`magprune`): the DARE / DELLA unbiasing. mergekit's current code instead
rescales to match the L1 norm of the untrimmed tensor; we follow the papers.
With `sparsegpt` the kept entries are already compensated, so rescaling
double-counts: it stays available but every method defaults it off there.

Inside `jit` / `vmap` / `grad`, densities, `gamma` and `epsilon` may be traced
arrays: the counts are then computed in the program with the same integers as
the eager host computation (`sgtv_jax.counts.exact_round`), the `density`
0 / 1 edges fall out of the selection itself, and range checks become checkify
checks with a NaN result (`sgtv_jax._checks.Guard`). The selection is a
constant for `grad` (no gradient flows through which entries are kept).

Layout: 2-D task vectors are `[out, in]` (PyTorch). Row-wise trims (`magprune`,
`wanda`) work per output row; tensors with more than 2 dims are viewed as
`[shape[0], -1]` (mergekit ranks DELLA along dim 1 only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from sgtv_jax import _checks, obs
from sgtv_jax.counts import exact_floor, exact_round
from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.hessian import input_norms
from sgtv_jax.merge import blockrng
from sgtv_jax.merge.keys import task_keys
from sgtv_jax.select import largest_mask

TRIMS = ("magnitude", "random", "magprune", "breadcrumbs", "wanda", "sparsegpt")
"""Known trims; the last two need calibration statistics (`Calibration`)."""
DATA_TRIMS = ("wanda", "sparsegpt")
COUNTS = ("round", "floor")
"""How `density * n` becomes an entry count: Python's `round` (ours) or `int` (mergekit's)."""
RANDOM_TRIMS = ("random", "magprune")
GAMMA = 0.01
"""breadcrumbs' default fraction of largest entries dropped as outliers (mergekit's)."""
EPSILON = 0.15
"""magprune's (DELLA's) default keep-probability spread around the density (mergekit's)."""


class Calibration(NamedTuple):
    """Calibration statistics of one linear layer's inputs (PyTorch layout, cols = in).

    hessian: `[cols, cols]` (shared by every task) or `[T, cols, cols]`, as from
      `sgtv_jax.hessian.hessian_finalize` (`H = (2/n) sum x x^T`).
    hessian_inv: full (damped) inverse Hessian, same shapes; used by `sparsegpt`
      only when `hessian` is absent (the PyTorch original's `hessian_invs`).
    norms: `[cols]` or `[T, cols]` input norms for `wanda`; derived from
      `hessian` (`sgtv_jax.hessian.input_norms`) when absent.
    """

    hessian: Any = None
    hessian_inv: Any = None
    norms: Any = None


def _check_count(count: str) -> None:
    if count not in COUNTS:
        raise ValueError(f"unknown count rule {count!r}; known: {', '.join(COUNTS)}")


def _count(density: float | jax.Array, n: int, count: str = "round") -> int | jax.Array:
    """`round(density * n)` (or `int(density * n)` for count "floor"): on the host for a
    known density, exactly the same integer in the program for a traced one."""
    _check_count(count)
    if _checks.is_traced(density):
        return (exact_floor if count == "floor" else exact_round)(density, (n,))
    known = cast(float, density)  # a Python or NumPy number here (round() of the float | Array union types as object)
    return int(known * n) if count == "floor" else int(round(known * n))


def _inverse(density: float | jax.Array, dtype: jnp.dtype) -> float | jax.Array:
    """`1 / density` (0 for density 0), the DARE rescale."""
    if _checks.is_traced(density):
        d = jnp.asarray(density, dtype)
        return jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1), 0)
    return 1.0 / density


def top_mask(scores: jax.Array, k: int | jax.Array) -> jax.Array:
    """Bool mask of the `k` largest entries of each row of `scores` `[..., n]`, ties stable.

    Same result as ranking with two stable argsorts (the earlier of equal
    entries is kept), by the exact radix select of `sgtv_jax.select`.
    """
    n = scores.shape[-1]
    return _keep_largest(scores.reshape(-1, n), jnp.asarray(k, jnp.int32)).reshape(scores.shape)


@jax.jit
def _keep_largest(rows: jax.Array, k: jax.Array) -> jax.Array:
    """Per row of `rows` `[r, n]`, the `k` largest (ties: the earlier kept).

    Compiled once per shape and dtype (`k` is traced).
    """
    return jax.vmap(largest_mask, in_axes=(0, None))(rows, k)


def random_mask(key: jax.Array, density: float | jax.Array, shape: tuple[int, ...], offset: int = 0) -> jax.Array:
    """DARE's keep mask: `jax.random.bernoulli(key, density, full_shape)`, entries from `offset` on.

    `offset` is the row-major flat index of the first entry within the tensor
    the key belongs to (0: the whole tensor), so row blocks of a tensor draw
    exactly the whole tensor's mask (`blockrng`).
    """
    if blockrng.counter_based(key):
        return blockrng.bernoulli_block(key, density, shape, offset)
    if offset:
        raise ValueError("random trims of a row block need a threefry key (JAX's default PRNG)")
    return jax.random.bernoulli(key, density, shape)


def _uniform(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, offset: int) -> jax.Array:
    """`jax.random.uniform(key, full_shape, dtype)`, entries from `offset` on (see `random_mask`)."""
    if blockrng.counter_based(key):
        return blockrng.uniform_block(key, shape, dtype, offset)
    if offset:
        raise ValueError("random trims of a row block need a threefry key (JAX's default PRNG)")
    return jax.random.uniform(key, shape, dtype)


def _edge(delta: jax.Array, density: float | jax.Array) -> jax.Array | None:
    """The density-1 / density-0 / empty shortcuts; a traced density takes none (the
    selection with k = n or 0 gives the same result)."""
    if delta.size == 0:
        return delta
    if _checks.is_traced(density):
        return None
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return jnp.zeros_like(delta)
    return None


def _finish(delta: jax.Array, kept: jax.Array, scale: Any) -> jax.Array:
    out = jnp.where(kept, delta.astype(_checks.work_dtype(delta.dtype)), 0)
    if scale is not None:
        out = out * scale
    return out.astype(delta.dtype)


def keep(delta: jax.Array, kept: jax.Array, density: float, *, rescale: bool = False) -> jax.Array:
    """`delta` where `kept`, else 0; times `1/density` when `rescale` (what every mask trim returns)."""
    return _finish(delta, kept, _inverse(density, _checks.work_dtype(delta.dtype)) if rescale else None)


def magnitude(delta: jax.Array, density: float, *, rescale: bool = False, count: str = "round") -> jax.Array:
    """Keep the `round(density * size)` (count "floor": `int(...)`) largest-`|d|` entries of `delta` (any shape)."""
    _check_count(count)
    if (e := _edge(delta, density)) is not None:
        return e
    # ranked in delta's own dtype: a bfloat16 |d| orders exactly as its float32 value, in half the bits
    flat = jnp.abs(delta.reshape(-1))
    kept = top_mask(flat, _count(density, flat.size, count)).reshape(delta.shape)
    return _finish(delta, kept, _inverse(density, _checks.work_dtype(delta.dtype)) if rescale else None)


def random(delta: jax.Array, density: float, key: jax.Array, *, rescale: bool = True, offset: int = 0) -> jax.Array:
    """DARE: keep each entry independently with probability `density` (Bernoulli).

    `offset`: for a block of rows of a larger tensor, the flat index of its
    first entry (the block then gets exactly its part of the whole tensor's mask).
    """
    if (e := _edge(delta, density)) is not None:
        return e
    kept = random_mask(key, density, delta.shape, offset)
    return _finish(delta, kept, _inverse(density, _checks.work_dtype(delta.dtype)) if rescale else None)


def magprune(
    delta: jax.Array,
    density: float,
    key: jax.Array,
    *,
    epsilon: float = EPSILON,
    rescale: bool = True,
    guard: _checks.Guard | None = None,
    offset: int = 0,
) -> jax.Array:
    """DELLA MagPrune: per row, keep probability linear in the magnitude rank.

    Within each row (of `[shape[0], -1]`; a vector is one row) the entries are
    ranked by `|d|` ascending, `r in [0, 1]` (`r = 1/2` for a 1-entry row), and
    kept with `p = density - epsilon + 2 * epsilon * r`; `rescale` divides the
    survivors by their own `p`. Needs `0 < density -/+ epsilon < 1` (as mergekit).
    `offset`: for a block of whole rows of a larger tensor, the flat index of
    its first entry (the block then draws exactly the whole tensor's numbers).
    """
    if (e := _edge(delta, density)) is not None:
        return e
    traced = _checks.is_traced(density, epsilon)
    own = guard is None
    guard = guard or _checks.Guard()
    if not traced and not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise ValueError(
            f"magprune needs 0 < density - epsilon and density + epsilon < 1, got "
            f"density={density!r}, epsilon={epsilon!r}"
        )
    if traced:
        # the 0 / 1 edges keep their eager meaning; in between the range rule holds
        d, eps = jnp.asarray(density), jnp.asarray(epsilon)
        guard.require(
            (d <= 0) | (d >= 1) | ((d - eps > 0) & (d + eps < 1)),
            "magprune needs 0 < density - epsilon and density + epsilon < 1",
        )
    dt = _checks.work_dtype(delta.dtype)
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[-1]
    order = jnp.argsort(jnp.abs(rows).astype(dt), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True).astype(dt)
    r = rank / (n - 1) if n > 1 else jnp.full(rank.shape, 0.5, dt)
    p = (density - epsilon) + 2.0 * epsilon * r
    kept = _uniform(key, rows.shape, dt, offset) < p
    out = _finish(rows, kept, 1.0 / p if rescale else None)
    if traced:
        d = jnp.asarray(density, dt)
        out = jnp.where(d >= 1, rows, jnp.where(d <= 0, 0, out)).astype(delta.dtype)
    out = out.reshape(delta.shape)
    return guard.apply(out) if own else out


def breadcrumbs(
    delta: jax.Array,
    density: float,
    *,
    gamma: float = GAMMA,
    rescale: bool = False,
    guard: _checks.Guard | None = None,
    count: str = "round",
) -> jax.Array:
    """Model Breadcrumbs: drop the top `gamma` outliers and the smallest, keep `density`.

    With `n` entries ranked by `|d|` descending, keeps ranks
    `[n_top, n_top + k)`, `n_top = round(gamma * n)`, `k = round(density * n)`
    (count "floor": `int(...)` for both, as mergekit); when `n_top + k > n`, fewer
    outliers are dropped (mergekit's rule).
    """
    _check_count(count)
    if (e := _edge(delta, density)) is not None:
        return e
    own = guard is None
    guard = guard or _checks.Guard()
    if not _checks.is_traced(gamma):
        if not (0.0 <= gamma <= 1.0):
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    else:
        g = jnp.asarray(gamma)
        guard.require((g >= 0) & (g <= 1), "gamma must be in [0, 1]")
    flat = jnp.abs(delta.reshape(-1))  # ranked in its own dtype, as in `magnitude`
    n = flat.size
    k = _count(density, n, count)
    top = _count(gamma, n, count)
    n_top = jnp.minimum(top, n - k) if _checks.is_traced(density, gamma) else min(top, n - k)
    # ranks [n_top, n_top + k) of the stable descending order: the top n_top + k minus the top n_top
    kept = (top_mask(flat, n_top + k) & ~top_mask(flat, n_top)).reshape(delta.shape)
    out = _finish(delta, kept, _inverse(density, _checks.work_dtype(delta.dtype)) if rescale else None)
    return guard.apply(out) if own else out


def wanda(
    delta: jax.Array, density: float, norms: jax.Array, *, rescale: bool = False, count: str = "round"
) -> jax.Array:
    """Wanda: per output row keep the `round(density*cols)` (or `int`) largest `|d_ij| * norms_j`.

    delta `[rows, cols]` (PyTorch layout), norms `[cols]` (`||x_j||`). No update
    of the kept entries (it is OBS with diag(H) only).
    """
    _check_count(count)
    if delta.ndim != 2:
        raise ValueError(f"wanda trimming needs a 2-D [out, in] task vector, got shape {delta.shape}")
    norms = jnp.asarray(norms)
    if norms.shape != (delta.shape[1],):
        raise ValueError(f"wanda norms must have shape ({delta.shape[1]},), got {norms.shape}")
    if (e := _edge(delta, density)) is not None:
        return e
    dt = _checks.work_dtype(delta.dtype)
    scores = jnp.abs(delta.astype(dt)) * norms.astype(dt)[None, :]
    kept = top_mask(scores, _count(density, delta.shape[1], count))
    return _finish(delta, kept, _inverse(density, dt) if rescale else None)


def sparsegpt(
    deltas: jax.Array, densities: Sequence[float] | jax.Array, calib: Calibration, **options: Any
) -> jax.Array:
    """OBS (SparseGPT) trimming of a stack `[T, rows, cols]`: `sparsegpt_info` (same options) without the damping."""
    return sparsegpt_info(deltas, densities, calib, **options)[0]


def sparsegpt_info(
    deltas: jax.Array,
    densities: Sequence[float] | jax.Array,
    calib: Calibration,
    *,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    refit: bool = False,
    rescale: bool = False,
    name: str | None = None,
    prunen: int = 0,
    prunem: int = 0,
) -> tuple[jax.Array, float | None]:
    """The one SparseGPT trim: (pruned stack `[T, rows, cols]`, damping used: None from an inverse or traced).

    Uses `calib.hessian` (`obs_prune`: dead columns, damping, factored once when
    shared) or else `calib.hessian_inv` (`obs_prune_from_inverse`). Kept entries
    change value (compensation) and may flip sign. `prunen:prunem` (prunem > 0)
    prunes N of every M columns instead of the densities. `refit=True` then
    re-solves the kept entries exactly for the final mask (`sgtv_jax.refit`;
    needs the Hessian). `rescale`: 1/density afterwards.
    """
    if deltas.ndim != 3:
        raise ValueError(
            f"sparsegpt trimming needs 2-D [out, in] task vectors{_checks.where(name)}, "
            f"got per-task shape {tuple(deltas.shape[1:])}"
        )
    dens: Any = densities if _checks.is_traced(densities) else list(densities)
    opts: dict[str, Any] = dict(prunen=prunen, prunem=prunem) if prunem else dict(density=dens)
    opts.update(blocksize=blocksize, name=name)
    damping: float | None = None
    if calib.hessian is not None:
        pruned, info = obs.obs_prune(deltas, calib.hessian, percdamp=percdamp, refit=refit, return_info=True, **opts)
        if not _checks.is_traced(info.percdamp):
            damping = float(jnp.max(info.percdamp))
    elif calib.hessian_inv is not None:
        if refit:
            raise ValueError(f"refit needs the Hessian itself, not its inverse{_checks.where(name)}")
        pruned, _ = obs.obs_prune_from_inverse(deltas, calib.hessian_inv, **opts)
    else:
        raise ValueError(missing_stats_message("sparsegpt", name))
    return (inverse_density_scale(pruned, densities) if rescale else pruned), damping


def inverse_density_scale(x: jax.Array, densities: Sequence[float] | jax.Array) -> jax.Array:
    """`x[t] / density_t` for a stack `[T, ...]` (DARE-style rescale; density 0 -> 0)."""
    if _checks.is_traced(densities):
        scale = (
            jnp.stack([jnp.asarray(_inverse(d, x.dtype)) for d in densities])
            if isinstance(densities, (list, tuple))
            else jnp.asarray(_inverse(jnp.asarray(densities), x.dtype))
        )
    else:
        scale = jnp.asarray([1.0 / d if d > 0 else 0.0 for d in densities], x.dtype)
    return x * scale.reshape((-1,) + (1,) * (x.ndim - 1))


def missing_stats_message(kind: str, name: str | None) -> str:
    need = "a Hessian (or inverse Hessian)" if kind == "sparsegpt" else "input norms or a Hessian"
    return (
        f"trim={kind!r} needs calibration statistics: {need}{_checks.where(name)}; compute them with "
        "sgtv_jax.hessian (hessian_update / hessian_finalize) and pass them in, or use a "
        "data-free trim (magnitude, random, magprune, breadcrumbs) for this tensor"
    )


def _per_task_stat(stat: Any, t: int, tasks: int, ndim: int) -> Any:
    stat = jnp.asarray(stat)
    return stat[t] if stat.ndim == ndim + 1 else stat


def _per_task_trim(
    kind: str,
    deltas: jax.Array,
    key: jax.Array | None,
    calib: Calibration,
    gamma: float | Sequence[float],
    epsilon: float | Sequence[float],
    rescale: bool,
    name: str | None,
    count: str,
    guard: _checks.Guard,
) -> tuple[Callable[..., jax.Array], list[Any]]:
    """`trim`'s per-task step `fn(delta_t, density_t, *extra_t)` of a data-free or wanda trim, and its
    per-task arguments `extra` (PRNG keys, epsilon, gamma or input norms), checked."""
    tasks = deltas.shape[0]
    extra: list[Any] = []
    if kind in RANDOM_TRIMS:
        if key is None:
            raise ValueError(f"trim={kind!r} is random: pass a PRNG key (or a seed){_checks.where(name)}")
        extra.append(task_keys(key, tasks))
    fn: Callable[..., jax.Array]
    if kind == "magnitude":

        def fn(x, d):
            return magnitude(x, d, rescale=rescale, count=count)
    elif kind == "random":

        def fn(x, d, k):
            return random(x, d, k, rescale=rescale)
    elif kind == "magprune":
        extra.append(_checks.per_task_values(epsilon, tasks, "epsilon", name, guard))

        def fn(x, d, k, e):
            return magprune(x, d, k, epsilon=e, rescale=rescale)
    elif kind == "breadcrumbs":
        gam = _checks.per_task_values(gamma, tasks, "gamma", name, guard)
        _checks.values_in_range(gam, 0.0, 1.0, "gamma", name, guard)
        extra.append(gam)

        def fn(x, d, g):
            return breadcrumbs(x, d, gamma=g, rescale=rescale, count=count)
    else:  # wanda
        if deltas.ndim != 3:
            raise ValueError(
                f"wanda trimming needs 2-D [out, in] task vectors{_checks.where(name)}, "
                f"got per-task shape {tuple(deltas.shape[1:])}"
            )
        norms = calib.norms
        if norms is None and calib.hessian is not None:
            norms = input_norms(jnp.asarray(calib.hessian))
        if norms is None:
            raise ValueError(missing_stats_message(kind, name))
        extra.append([_per_task_stat(norms, t, tasks, 1) for t in range(tasks)])

        def fn(x, d, nrm):
            return wanda(x, d, nrm, rescale=rescale, count=count)

    return fn, extra


def trim(
    kind: str,
    deltas: jax.Array,
    densities: float | Sequence[float] | jax.Array,
    *,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: float | Sequence[float] = GAMMA,
    epsilon: float | Sequence[float] = EPSILON,
    rescale: bool = False,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    refit: bool = False,
    name: str | None = None,
    count: str = "round",
) -> jax.Array:
    """Trim each task vector of a stack `[T, ...]`; returns `[T, ...]` (same dtype).

    Args:
      kind: one of `TRIMS`.
      densities: one fraction kept per task (or one for all), in [0, 1].
      key: PRNG key of this tensor (`keys.tensor_key`); task t uses `fold_in(key, t)`.
        Required for `random` / `magprune`.
      calib: statistics for `wanda` / `sparsegpt`.
      gamma: breadcrumbs' outlier fraction, per task or shared.
      epsilon: magprune's half-width of the keep-probability range.
      count: "round" (default) or "floor" (mergekit's `int`) for the entry counts of
        `magnitude`, `breadcrumbs` and `wanda` (the others take no count).
    """
    _check_count(count)
    if kind not in TRIMS:
        raise ValueError(f"unknown trim {kind!r}; known trims: {', '.join(TRIMS)}")
    tasks = deltas.shape[0]
    guard = _checks.Guard()
    dens = _checks.densities_values(densities, tasks, name, guard)
    calib = calib or Calibration()
    if kind == "sparsegpt":
        if calib.hessian is None and calib.hessian_inv is None:
            raise ValueError(missing_stats_message(kind, name))
        return guard.apply(
            sparsegpt(
                deltas, dens, calib, blocksize=blocksize, percdamp=percdamp, refit=refit, rescale=rescale, name=name
            )
        )
    # per task: fn(delta_t, density_t, *per_task_args_t); shared args are closed over
    fn, extra = _per_task_trim(kind, deltas, key, calib, gamma, epsilon, rescale, name, count, guard)
    args: list = [deltas, dens, *extra]
    if all(isinstance(a, (tuple, list)) for a in args[1:]) and not _checks.is_traced(*args[1:]):
        # known parameters: one call per task with Python floats (host counts, edge shortcuts)
        return jnp.stack([fn(*(a[t] for a in args)) for t in range(tasks)])
    # traced parameters: one vmapped selection over tasks (counts computed in the program)
    batched = [a if not isinstance(a, (list, tuple)) else jnp.stack([jnp.asarray(v) for v in a]) for a in args]
    return guard.apply(jax.vmap(fn)(*batched))
