"""Many merges of one tensor in one compiled program: a grid of settings.

    from sgtv_jax.merge.batch import merge_grid
    out = merge_grid("ties", stack, weights=W, densities=[0.1, 0.2, 0.3],
                     lambdas=[0.8, 1.0], trim="sparsegpt", calib=Calibration(hessian=H))
    out.shape == (3, len(W), 2) + stack.shape[1:]     # [D, W, L, ...]
    out[i, j, k] == ties(stack, weights=W[j], densities=densities[i],
                         lambda_=lambdas[k], trim="sparsegpt", calib=...)

One `jit` of three nested `vmap`s over the method, called as the plan
interpreter resolves it (`call.interpret`, executed by `plan.run_whole`: the
same trim, rescale, count and statistics as `merge_planned`). What does not depend on a
grid axis is computed once: the inverse-Hessian factor of `sparsegpt` (H and
`percdamp` are shared), and the trim of each density (it does not depend on
the weights or lambda), so a D x W x L grid costs D trims plus D x W cheap
elect / combine steps, not D x W x L full merges. Compiled once per method,
static parameters and shapes; new values of the grid do not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax import _checks
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.call import MergeCall, ObsOptions, interpret
from sgtv_jax.merge.plan import TensorPlan, run_whole
from sgtv_jax.merge.specs import call_args, method_spec
from sgtv_jax.merge.trim import Calibration

# Numeric method parameters that stay traced (changing them does not recompile).
TRACED_PARAMS = ("gamma", "epsilon", "percdamp", "alpha", "proxy_gram")


def _grid_axis(values: Any, tasks: int, what: str) -> jax.Array:
    """`[n]` or `[n, T]` -> `[n, T]` float (a scalar is one setting shared by every task)."""
    arr = jnp.asarray(values)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float32)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim == 1:
        arr = jnp.broadcast_to(arr[:, None], (arr.shape[0], tasks))
    if arr.ndim != 2 or arr.shape[1] != tasks or arr.shape[0] == 0:
        raise ValueError(
            f"{what} must be [settings] or [settings, {tasks}] (one entry per task vector), "
            f"got shape {tuple(arr.shape)}"
        )
    return arr


# The grid's keywords that are the trim's options, not the method's: the plan's fields.
_OBS_PARAMS = ("blocksize", "percdamp", "refit")
_PER_TASK = {"gamma": trim_lib.GAMMA, "epsilon": trim_lib.EPSILON}


def _grid_call(method: str, params: dict[str, Any], ndim: int, calib: Calibration | None, key: Any) -> MergeCall:
    """The `MergeCall` of one grid point: the grid's keywords as a `TensorPlan`, through `call.interpret`.

    The weights and densities are the grid's (traced) axes, given to the executor
    directly; `key` is used as it is (not folded with a tensor name); `gamma` /
    `epsilon` are scalars shared by the tasks; `trim=None` given explicitly
    means no trim (a plan's None is the method's default trim).
    """
    p = dict(params)
    trim = p.pop("trim", None)
    obs = ObsOptions(**{k: p.pop(k) for k in _OBS_PARAMS if k in p})
    name = p.pop("name", None)
    per_task = {k: p.pop(k, default) for k, default in _PER_TASK.items()}
    plan = TensorPlan(method, name or "", (), (), trim=trim, params=p, obs=obs)
    call = interpret(plan, ndim=ndim, calib=calib)
    if "trim" in params and trim is None:
        call = dataclasses.replace(call, trim=None)
    return dataclasses.replace(call, name=name, key=key, **per_task)


@functools.partial(jax.jit, static_argnames=("method", "static"))
def _grid(deltas, weights, densities, lambdas, calib, key, traced, *, method, static):
    call = _grid_call(method, {**dict(static), **traced}, deltas.ndim - 1, calib, key)

    def one(d, w):
        return run_whole(call, deltas, w, d, calib)

    over_w = jax.vmap(one, in_axes=(None, 0))
    if densities is None:
        merged = over_w(None, weights)[None]
    else:
        merged = jax.vmap(over_w, in_axes=(0, None))(densities, weights)
    # lambda scales the merged task vector (as every method's `lambda_` does)
    lam = lambdas.astype(merged.dtype).reshape((1, 1, -1) + (1,) * (merged.ndim - 2))
    return merged[:, :, None] * lam


def merge_grid(
    method: str,
    deltas: jax.Array,
    weights: Any,
    densities: Any = None,
    lambdas: Any = None,
    *,
    calib: Calibration | None = None,
    key: jax.Array | None = None,
    **params: Any,
) -> jax.Array:
    """Merge one tensor's task vectors for a grid of settings in one compiled call.

    Args:
      method: a merge method name (`sgtv_jax.merge.available_methods()`).
      deltas: task vectors `[T, ...]`.
      weights: `[W, T]` weight vectors (or `[T]`: one setting).
      densities: `[D]` (shared by the tasks) or `[D, T]`; None for methods that
        do not trim (result axis D has size 1).
      lambdas: `[L]` global scales (default `[1.0]`); applied to the merged task
        vector as `lambda_` is.
      calib: `Calibration` for `trim="sparsegpt"` / `"wanda"`; for `regmean`,
        `calib.hessian` are the Grams. The Hessian fits (`lstsq`, `regmean_trim`,
        `regmean_sparse`) take `calib` itself: its Hessian is both their Grams and
        their trim's statistics. Methods that neither trim nor read Grams refuse it.
      key: the tensor's PRNG key for random trims (the same masks as eager calls
        with this key).
      **params: the method's other parameters. `gamma`, `epsilon`, `percdamp`,
        `alpha`, `proxy_gram` and array values (`base`) stay traced; the rest (`trim`, `consensus`, `normalize`,
        `rescale`, `refit`, `blocksize`, ...) are static.
    Returns:
      `[D, W, L, ...]`: entry `[i, j, k]` equals
      `method(deltas, weights[j], densities[i], lambda_=lambdas[k], ...)`.
      In the program the grid values are float32 (float64 with x64): counts are
      those of an eager call with `float(np.float32(d))`, identical to the
      Python float's except when `(1 - d) * n` lies within `n * 3e-8` of a
      half-integer.
    """
    spec = method_spec(method)
    deltas = _checks.stack(deltas)
    tasks = deltas.shape[0]
    w = _grid_axis(weights, tasks, "weights")
    if not isinstance(w, jax.core.Tracer):
        for row in np.asarray(w):
            _checks.per_task(list(row), tasks, "weights")
    d = None
    if densities is not None:
        d = _grid_axis(densities, tasks, "densities")
        if not isinstance(d, jax.core.Tracer):
            for row in np.asarray(d):
                _checks.densities(list(row), tasks)
    lam = jnp.atleast_1d(jnp.asarray(1.0 if lambdas is None else lambdas))
    if lam.ndim != 1:
        raise ValueError(f"lambdas must be [settings], got shape {tuple(lam.shape)}")
    if "lambda_" in params or "lambda" in params:
        raise ValueError("give the global scale as lambdas=[...] (a grid axis), not lambda_")
    accepted = set(grid_parameters(method))
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"method {method!r} has no parameter(s) {unknown}")
    if densities is not None and "densities" not in call_args(spec):
        raise ValueError(f"method {method!r} takes no densities")
    if calib is not None and not (spec.trims or spec.needs_grams):
        raise ValueError(f"method {method!r} takes no calib")

    def is_traced(k: str, v: Any) -> bool:
        return k in TRACED_PARAMS or isinstance(v, (np.ndarray, jax.Array))

    traced = {k: jnp.asarray(v) for k, v in params.items() if is_traced(k, v)}
    static = tuple(sorted((k, v) for k, v in params.items() if not is_traced(k, v)))
    try:
        hash(static)
    except TypeError as e:
        raise ValueError(f"parameters other than {TRACED_PARAMS} must be hashable Python values") from e
    return _grid(deltas, w, d, lam, calib, key, traced, method=method, static=static)


# What the grid itself passes to the method (task vectors, a grid axis, statistics, the key).
_GRID_ARGS = ("deltas", "weights", "densities", "calib", "key", "grams")


def grid_parameters(method: str) -> tuple[str, ...]:
    """Keywords `merge_grid` passes on to `method` (from its spec, not its signature)."""
    spec = method_spec(method)
    return tuple(ps.keyword for ps in spec.params) + tuple(a for a in call_args(spec) if a not in _GRID_ARGS)
