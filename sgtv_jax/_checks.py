"""Input checks shared by the public functions: fail loudly, name the argument."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def as_array(x: Any, name: str) -> jax.Array:
    """NumPy / JAX / torch (CPU) array -> JAX array, without importing torch."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        # torch has no numpy bfloat16; go through float32, which is exact.
        if str(x.dtype) == "torch.bfloat16":
            return jnp.asarray(x.float().numpy()).astype(jnp.bfloat16)
        x = x.numpy()
    try:
        return jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e


def require_finite(x: jax.Array, name: str) -> None:
    """Raise ValueError if `x` holds NaN or Inf (one host sync)."""
    if not bool(jnp.all(jnp.isfinite(x))):
        n_bad = int(jnp.sum(~jnp.isfinite(x)))
        raise ValueError(f"{name} contains {n_bad} NaN or Inf entries")


def check_density(density: float, name: str = "density") -> float:
    try:
        d = float(density)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number in [0, 1], got {density!r}") from e
    if not (0.0 <= d <= 1.0) or math.isnan(d):
        raise ValueError(f"{name} must be in [0, 1], got {density!r}")
    return d


def densities_for_stack(density: float | Sequence[float] | None, tasks: int) -> tuple[float, ...]:
    """One density per task: a scalar is broadcast; a sequence must have length `tasks`."""
    if density is None:
        raise ValueError("density is required for unstructured pruning (or give prunen/prunem)")
    if np.ndim(density) == 0:
        return (check_density(density),) * tasks
    values = [check_density(d, f"density[{i}]") for i, d in enumerate(density)]
    if len(values) != tasks:
        raise ValueError(f"density has {len(values)} entries but there are {tasks} task vectors")
    return tuple(values)


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
