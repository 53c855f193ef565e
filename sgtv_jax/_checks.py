"""Input checks shared by the public functions: fail loudly, name the argument."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from sgtv_jax import numparse


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


def check_density(density: Any, name: str = "density") -> float:
    try:
        d = float(density)
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: float(10**400)
        raise ValueError(f"{name} must be a number in [0, 1], got {density!r}") from e
    if not (0.0 <= d <= 1.0) or math.isnan(d):
        raise ValueError(f"{name} must be in [0, 1], got {density!r}")
    return d


def densities_for_stack(density: float | Sequence[float] | None, tasks: int) -> tuple[float, ...]:
    """One density per task: a scalar is broadcast; a sequence must have length `tasks`."""
    if density is None:
        raise ValueError("density is required for unstructured pruning (or give prunen/prunem)")
    if isinstance(density, (int, float)) or np.ndim(density) == 0:
        return (check_density(density),) * tasks
    values = [check_density(d, f"density[{i}]") for i, d in enumerate(density)]
    if len(values) != tasks:
        raise ValueError(f"density has {len(values)} entries but there are {tasks} task vectors")
    return tuple(values)


def check_positive_int(value: Any, name: str) -> int:
    non_finite = isinstance(value, float) and not math.isfinite(value)  # int(inf) raises OverflowError
    if isinstance(value, bool) or non_finite or int(value) != value or int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- checks under tracing


def is_traced(*xs: Any) -> bool:
    """True if any argument (or element of a list / tuple argument) is a JAX tracer."""
    for x in xs:
        if isinstance(x, (list, tuple)):
            if is_traced(*x):
                return True
        elif isinstance(x, jax.core.Tracer):
            return True
    return False


def known(ok: Any) -> bool | None:
    """The Python bool of a scalar when its value is known now, else None (inside jit / vmap)."""
    try:
        return bool(ok)
    except jax.errors.ConcretizationTypeError:
        return None


class Guard:
    """Value checks that raise now when the value is known, and stay in the program when traced.

    `require(ok, message)`: with a concrete `ok`, raises `ValueError(message)`
    at once (the eager behaviour). With a traced `ok` (inside `jit`, `vmap`,
    `scan`, ...), it records the condition twice: as a
    `jax.experimental.checkify.debug_check` (an error with this message under
    `checkify.checkify(f, errors=checkify.user_checks)`, a no-op otherwise),
    and in `apply`, which turns the result into NaN where the check failed.
    So a bad value inside compiled code is never a silent wrong result.
    """

    def __init__(self) -> None:
        self.ok: jax.Array | None = None

    def require(self, ok: Any, message: str | Callable[[], str], traced: str | None = None) -> None:
        """`message`: the eager error (a callable to build it only on failure);
        `traced`: the checkify message (default: `message` when it is a string)."""
        ok = jnp.all(jnp.asarray(ok))
        value = known(ok)
        if value is None:
            text = traced or (message if isinstance(message, str) else "a value check failed")
            # checkify formats the message with str.format: escape braces
            checkify.debug_check(ok, text.replace("{", "{{").replace("}", "}}"))
            self.ok = ok if self.ok is None else self.ok & ok
        elif not value:
            raise ValueError(message if isinstance(message, str) else message())

    def finite(self, x: jax.Array, name: str) -> None:
        """`x` holds no NaN / Inf (the eager message counts the bad entries)."""
        ok = jnp.all(jnp.isfinite(x))
        self.require(
            ok,
            lambda: f"{name} contains {int(jnp.sum(~jnp.isfinite(x)))} NaN or Inf entries",
            f"{name} contains NaN or Inf entries",
        )

    def apply(self, out: Any) -> Any:
        """`out` (an array or a pytree) with every floating leaf NaN where a traced check failed."""
        if self.ok is None:
            return out
        ok = self.ok

        def poison(x):
            x = jnp.asarray(x)
            if not jnp.issubdtype(x.dtype, jnp.inexact):
                return x
            return jnp.where(ok, x, jnp.nan)

        return jax.tree_util.tree_map(poison, out)


def check_percdamp(percdamp: Any, guard: Guard) -> None:
    """percdamp (relative damping) must be a finite number >= 0."""
    if not is_traced(percdamp):
        try:
            p = float(percdamp)
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: float(10**400)
            raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}") from e
        if not (math.isfinite(p) and p >= 0):
            raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
        return
    pa = jnp.asarray(percdamp)
    if pa.ndim != 0:
        raise ValueError(f"percdamp must be a scalar, got shape {pa.shape}")
    guard.require(jnp.isfinite(pa) & (pa >= 0), "percdamp must be a finite number >= 0")


def symmetry_tolerance(dtype: jnp.dtype) -> float:
    """Relative tolerance of `|H - H^T| <= tol * max|H|`: sqrt(machine epsilon) of the dtype."""
    return float(np.sqrt(np.finfo(np.dtype(jnp.result_type(dtype, jnp.float32))).eps))


def check_symmetric(h: jax.Array, name: str, guard: Guard) -> None:
    """H `[..., n, n]` must be symmetric to `symmetry_tolerance` of its largest entry.

    The factor reads only one triangle of H (and the refit both), so an
    asymmetric matrix would silently be a different problem.
    """
    x = h.astype(jnp.result_type(h.dtype, jnp.float32))
    gap = jnp.max(jnp.abs(x - jnp.swapaxes(x, -1, -2)), initial=0.0)
    top = jnp.max(jnp.abs(x), initial=0.0)
    tol = symmetry_tolerance(x.dtype)
    # NaN (checked separately) must not also be reported as asymmetry
    ok = ~(gap > tol * top)
    guard.require(
        ok,
        lambda: (
            f"{name} is not symmetric: max |H - H^T| = {float(gap):.3g} exceeds "
            f"{tol:.1e} * max |H| = {tol * float(top):.3g}; pass (H + H^T) / 2 if that is what you mean"
        ),
        f"{name} is not symmetric: max |H - H^T| exceeds {tol:.1e} * max |H|",
    )


def _traced_floats(value: Any, tasks: int) -> jax.Array:
    """`value` (a scalar, an array, or a list of scalars) as a float array; a scalar broadcast to `[tasks]`."""
    arr = jnp.stack([jnp.asarray(v) for v in value]) if isinstance(value, (list, tuple)) else jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float32)
    return jnp.broadcast_to(arr, (tasks,)) if arr.ndim == 0 else arr


def density_values(density: Any, tasks: int, guard: Guard, name: str = "density") -> tuple[float, ...] | jax.Array:
    """One density per task: Python floats when known now (today's checks and
    messages), else a traced float array `[tasks]` range-checked through `guard`."""
    if not is_traced(density):
        return densities_for_stack(density, tasks)
    d = _traced_floats(density, tasks)
    if d.shape != (tasks,):
        raise ValueError(f"{name} has shape {d.shape} but there are {tasks} task vectors")
    guard.require((d >= 0) & (d <= 1), f"{name} must be in [0, 1]")
    return d


# --------------------------------------------------------------------------- merge-method arguments
#
# Shapes and dtypes are checked when the function is traced. Values (NaN / Inf,
# ranges) are checked at once when they are known (eager calls, Python floats
# under `jit`) and otherwise through a `Guard`: a checkify user check plus NaN
# in the result, never a silent wrong merge.


def tensor_mismatch(
    base: Mapping[str, tuple[int, ...]], other: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """How `other`'s tensor shapes (name -> shape) differ from `base`'s.

    Returns (names of `base` that `other` lacks, names `other` adds (both sorted),
    shared names whose shapes differ, in `base`'s order).
    """
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    return missing, extra, [n for n in base if n in other and other[n] != base[n]]


def where(name: str | None) -> str:
    """The suffix ` for tensor 'name'` of error messages (empty without a name)."""
    return f" for tensor {name!r}" if name else ""


def per_task(value: Any, tasks: int, what: str, name: str | None = None) -> tuple[float, ...]:
    """A scalar broadcast to `tasks` floats, or a sequence that must have length `tasks`."""
    if value is None:
        raise ValueError(f"{what} is required{where(name)}")
    if np.ndim(value) == 0:
        values = [value] * tasks
    else:
        values = list(np.asarray(value).reshape(-1)) if not isinstance(value, (list, tuple)) else list(value)
        if len(values) != tasks:
            raise ValueError(
                f"{what} has {len(values)} entries but there are {tasks} task vectors (models){where(name)}"
            )
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}[{i}] must be a number, got {v!r}{where(name)}") from e
        except OverflowError:  # an int beyond float range (numparse's rule)
            raise ValueError(f"{what}[{i}] must be finite, got {numparse.show(v)}{where(name)}") from None
        if math.isnan(f) or math.isinf(f):
            raise ValueError(f"{what}[{i}] must be finite, got {v!r}{where(name)}")
        out.append(f)
    return tuple(out)


def per_task_values(value: Any, tasks: int, what: str, name: str | None, guard: Guard) -> tuple[float, ...] | jax.Array:
    """`per_task` when the values are known now (Python floats, same checks and
    messages); a traced float array `[tasks]` (finite-checked by `guard`) otherwise."""
    if not is_traced(value):
        return per_task(value, tasks, what, name)
    if isinstance(value, (list, tuple)) and len(value) != tasks:
        raise ValueError(f"{what} has {len(value)} entries but there are {tasks} task vectors (models){where(name)}")
    arr = _traced_floats(value, tasks)
    if arr.shape != (tasks,):
        raise ValueError(f"{what} has shape {arr.shape} but there are {tasks} task vectors (models){where(name)}")
    guard.require(jnp.isfinite(arr), f"{what} must be finite{where(name)}")
    return arr


def values_in_range(
    values: tuple[float, ...] | jax.Array,
    lo: float,
    hi: float,
    what: str,
    name: str | None,
    guard: Guard,
) -> None:
    """`in_range` for known values; a `guard` check for traced ones."""
    if isinstance(values, tuple):
        in_range(values, lo, hi, what, name)
    else:
        guard.require((values >= lo) & (values <= hi), f"{what} must be in [{lo:g}, {hi:g}]{where(name)}")


def in_range(values: Sequence[float], lo: float, hi: float, what: str, name: str | None = None) -> None:
    for i, v in enumerate(values):
        if not (lo <= v <= hi):
            raise ValueError(f"{what}[{i}] must be in [{lo:g}, {hi:g}], got {v!r}{where(name)}")


def densities(value: Any, tasks: int, name: str | None = None) -> tuple[float, ...]:
    d = per_task(value, tasks, "densities", name)
    in_range(d, 0.0, 1.0, "densities", name)
    return d


def densities_values(value: Any, tasks: int, name: str | None, guard: Guard) -> tuple[float, ...] | jax.Array:
    """`densities` for known values, else a traced `[tasks]` array range-checked by `guard`."""
    d = per_task_values(value, tasks, "densities", name, guard)
    values_in_range(d, 0.0, 1.0, "densities", name, guard)
    return d


def stack(deltas: Any, name: str | None = None, *, min_ndim: int = 1, guard: Guard | None = None) -> jax.Array:
    """Task vectors as one `[T, ...]` floating array; raises on NaN/Inf naming the task.

    With traced task vectors the NaN/Inf check goes through `guard`.
    """
    if isinstance(deltas, (list, tuple)):
        arrays = [as_array(d, "task vector") for d in deltas]
        shapes = {tuple(a.shape) for a in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"task vectors have different shapes{where(name)}: "
                + ", ".join(f"[{i}] {tuple(a.shape)}" for i, a in enumerate(arrays))
            )
        deltas = jnp.stack(arrays)
    else:
        deltas = as_array(deltas, "deltas")
    if deltas.ndim < min_ndim + 1:
        raise ValueError(
            f"deltas must be a stack [T, ...] with at least {min_ndim} dimension(s) per task,"
            f" got shape {tuple(deltas.shape)}{where(name)}"
        )
    if deltas.shape[0] == 0:
        raise ValueError(
            f"no task vectors to merge{where(name)}: the stack of models is empty (shape {tuple(deltas.shape)})"
        )
    if not jnp.issubdtype(deltas.dtype, jnp.floating):
        raise ValueError(f"task vectors must be floating point, got {deltas.dtype}{where(name)}")
    finite = jnp.all(jnp.isfinite(deltas.reshape(deltas.shape[0], -1)), axis=1)
    if known(jnp.all(finite)) is None:
        (guard or Guard()).require(finite, f"NaN or Inf in task vector(s){where(name)}")
    elif not bool(jnp.all(finite)):
        bad = [int(i) for i in np.flatnonzero(~np.asarray(finite))]
        counts = [int(jnp.sum(~jnp.isfinite(deltas[i]))) for i in bad]
        raise ValueError(
            "NaN or Inf in task vector(s)"
            + where(name)
            + ": "
            + ", ".join(f"model {i} ({c} entries)" for i, c in zip(bad, counts))
        )
    return deltas


def work_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for low-precision inputs; float64 stays float64."""
    return jnp.result_type(dtype, jnp.float32)
