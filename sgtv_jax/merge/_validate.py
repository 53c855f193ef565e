"""Argument checks for the merge functions: fail early, name what is wrong."""

from __future__ import annotations

import math
from typing import Any, Sequence

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
                f"{what} has {len(values)} entries but there are {tasks} task vectors"
                f" (models){_where(name)}"
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


def in_range(values: Sequence[float], lo: float, hi: float, what: str, name: str | None = None) -> None:
    for i, v in enumerate(values):
        if not (lo <= v <= hi):
            raise ValueError(f"{what}[{i}] must be in [{lo:g}, {hi:g}], got {v!r}{_where(name)}")


def densities(value: Any, tasks: int, name: str | None = None) -> tuple[float, ...]:
    d = per_task(value, tasks, "densities", name)
    in_range(d, 0.0, 1.0, "densities", name)
    return d


def stack(deltas: Any, name: str | None = None, *, min_ndim: int = 1) -> jax.Array:
    """Task vectors as one `[T, ...]` floating array; raises on NaN/Inf naming the task."""
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
    if not jnp.issubdtype(deltas.dtype, jnp.floating):
        raise ValueError(f"task vectors must be floating point, got {deltas.dtype}{_where(name)}")
    finite = jnp.all(jnp.isfinite(deltas.reshape(deltas.shape[0], -1)), axis=1)
    if not bool(jnp.all(finite)):
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
