"""Argument checks for the merge functions: fail early, name what is wrong.

Shapes and dtypes are checked when the function is traced. Values (NaN / Inf,
ranges) are checked at once when they are known (eager calls, Python floats
under `jit`) and otherwise through a `sgtv_jax._checks.Guard`: a checkify
user check plus NaN in the result, never a silent wrong merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax import _checks


def _where(name: str | None) -> str:
    return f" for tensor {name!r}" if name else ""


def per_task(value: Any, tasks: int, what: str, name: str | None = None) -> tuple[float, ...]:
    """A scalar broadcast to `tasks` floats, or a sequence that must have length `tasks`."""
    if value is None:
        raise ValueError(f"{what} is required{_where(name)}")
    if np.ndim(value) == 0:
        values = [value] * tasks
    else:
        values = list(np.asarray(value).reshape(-1)) if not isinstance(value, (list, tuple)) else list(value)
        if len(values) != tasks:
            raise ValueError(
                f"{what} has {len(values)} entries but there are {tasks} task vectors (models){_where(name)}"
            )
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}[{i}] must be a number, got {v!r}{_where(name)}") from e
        if math.isnan(f) or math.isinf(f):
            raise ValueError(f"{what}[{i}] must be finite, got {v!r}{_where(name)}")
        out.append(f)
    return tuple(out)


def per_task_values(
    value: Any, tasks: int, what: str, name: str | None, guard: _checks.Guard
) -> tuple[float, ...] | jax.Array:
    """`per_task` when the values are known now (Python floats, same checks and
    messages); a traced float array `[tasks]` (finite-checked by `guard`) otherwise."""
    if not _checks.is_traced(value):
        return per_task(value, tasks, what, name)
    if isinstance(value, (list, tuple)):
        if len(value) != tasks:
            raise ValueError(
                f"{what} has {len(value)} entries but there are {tasks} task vectors (models){_where(name)}"
            )
        arr = jnp.stack([jnp.asarray(v) for v in value])
    else:
        arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float32)
    if arr.ndim == 0:
        arr = jnp.broadcast_to(arr, (tasks,))
    if arr.shape != (tasks,):
        raise ValueError(f"{what} has shape {arr.shape} but there are {tasks} task vectors (models){_where(name)}")
    guard.require(jnp.isfinite(arr), f"{what} must be finite{_where(name)}")
    return arr


def values_in_range(
    values: tuple[float, ...] | jax.Array,
    lo: float,
    hi: float,
    what: str,
    name: str | None,
    guard: _checks.Guard,
) -> None:
    """`in_range` for known values; a `guard` check for traced ones."""
    if isinstance(values, tuple):
        in_range(values, lo, hi, what, name)
    else:
        guard.require((values >= lo) & (values <= hi), f"{what} must be in [{lo:g}, {hi:g}]{_where(name)}")


def in_range(values: Sequence[float], lo: float, hi: float, what: str, name: str | None = None) -> None:
    for i, v in enumerate(values):
        if not (lo <= v <= hi):
            raise ValueError(f"{what}[{i}] must be in [{lo:g}, {hi:g}], got {v!r}{_where(name)}")


def densities(value: Any, tasks: int, name: str | None = None) -> tuple[float, ...]:
    d = per_task(value, tasks, "densities", name)
    in_range(d, 0.0, 1.0, "densities", name)
    return d


def densities_values(value: Any, tasks: int, name: str | None, guard: _checks.Guard) -> tuple[float, ...] | jax.Array:
    """`densities` for known values, else a traced `[tasks]` array range-checked by `guard`."""
    d = per_task_values(value, tasks, "densities", name, guard)
    values_in_range(d, 0.0, 1.0, "densities", name, guard)
    return d


def stack(deltas: Any, name: str | None = None, *, min_ndim: int = 1, guard: _checks.Guard | None = None) -> jax.Array:
    """Task vectors as one `[T, ...]` floating array; raises on NaN/Inf naming the task.

    With traced task vectors the NaN/Inf check goes through `guard`.
    """
    if isinstance(deltas, (list, tuple)):
        arrays = [_checks.as_array(d, "task vector") for d in deltas]
        shapes = {tuple(a.shape) for a in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"task vectors have different shapes{_where(name)}: "
                + ", ".join(f"[{i}] {tuple(a.shape)}" for i, a in enumerate(arrays))
            )
        deltas = jnp.stack(arrays)
    else:
        deltas = _checks.as_array(deltas, "deltas")
    if deltas.ndim < min_ndim + 1:
        raise ValueError(
            f"deltas must be a stack [T, ...] with at least {min_ndim} dimension(s) per task,"
            f" got shape {tuple(deltas.shape)}{_where(name)}"
        )
    if deltas.shape[0] == 0:
        raise ValueError(
            f"no task vectors to merge{_where(name)}: the stack of models is empty (shape {tuple(deltas.shape)})"
        )
    if not jnp.issubdtype(deltas.dtype, jnp.floating):
        raise ValueError(f"task vectors must be floating point, got {deltas.dtype}{_where(name)}")
    finite = jnp.all(jnp.isfinite(deltas.reshape(deltas.shape[0], -1)), axis=1)
    if _checks.known(jnp.all(finite)) is None:
        (guard or _checks.Guard()).require(finite, f"NaN or Inf in task vector(s){_where(name)}")
    elif not bool(jnp.all(finite)):
        bad = [int(i) for i in np.flatnonzero(~np.asarray(finite))]
        counts = [int(jnp.sum(~jnp.isfinite(deltas[i]))) for i in bad]
        raise ValueError(
            "NaN or Inf in task vector(s)"
            + _where(name)
            + ": "
            + ", ".join(f"model {i} ({c} entries)" for i, c in zip(bad, counts))
        )
    return deltas


def work_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for low-precision inputs; float64 stays float64."""
    return jnp.result_type(dtype, jnp.float32)
