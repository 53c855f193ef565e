"""What every merge run driver shares: the protocol, the "tensor unchanged" rule, the report row, the error translation.

Drivers: `sequential.MergeRun` (calibrated, block by block), `datafree.DataFreeRun`
(tensor by tensor, by name) and `mapped.MappedRun` (by name with a vocabulary
map). Each turns a tensor's `TensorPlan` into a merge through the executors of
`sgtv_jax.merge` (`plan.merge_planned` whole, `streaming.merge_rows` in row
chunks) and reports one `LayerRecord` per tensor, by the rules here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, Protocol

import jax
import numpy as np

from sgtv_jax.errors import NumericsError, SgtvError
from sgtv_jax.merge.plan import MergeInfo, PlanError, TensorPlan, maps_zero_to_zero
from sgtv_jax.pipeline.arch import Arch
from sgtv_jax.pipeline.config import ConfigError, MergeConfig
from sgtv_jax.pipeline.planning import plan_tensor
from sgtv_jax.pipeline.report import LayerRecord

Tensors = dict[str, np.ndarray]


class RunDriver(Protocol):
    """A merge run: yields the output tensors, then reports what it did."""

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]: ...

    def report(self, wall_s: float) -> dict[str, Any]: ...


class translated:  # noqa: N801 - used as a `with` statement, like contextlib's helpers
    """`with translated(plan): ...`: the merge library's errors for one tensor, in the CLI's terms.

    A `PlanError` (the config asks what the method cannot do for this tensor)
    becomes a `ConfigError`; another `ValueError` (the library's checks on this
    tensor's values: an indefinite Hessian after damping, NaN task vectors,
    magprune's bounds, ...) a `NumericsError` naming the tensor, method and trim.
    `SgtvError`s pass as they are.
    """

    def __init__(self, plan: TensorPlan) -> None:
        self.plan = plan

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if e is None or isinstance(e, SgtvError) or not isinstance(e, ValueError):
            return False
        if isinstance(e, PlanError):
            raise ConfigError(str(e)) from e
        p = self.plan
        raise NumericsError(f"merging tensor {p.name!r} ({p.method}, trim {p.trim or 'default'}): {e}") from e


def unchanged(plan: TensorPlan, deltas: jax.Array) -> bool:
    """The "tensor unchanged" rule: no model changed it (all task vectors `[T, ...]` zero) and the
    method maps zero task vectors to zero, so the base tensor is the result (no trim / merge work)."""
    return maps_zero_to_zero(plan.method) and not any(np.any(deltas[t] != 0) for t in range(deltas.shape[0]))


def untouched_linear(cfg: MergeConfig, arch: Arch, i: int, base: Tensors, models: list[Tensors]) -> set[str]:
    """Block i's linear layers (HF-local names) that `unchanged` leaves as the base whatever their H,
    read from the raw tensors (`base`, each model's: HF-named) before any task vector is formed, so
    the calibrated driver accumulates no Gram for them. Conservative: float64 models that differ
    from the base only below float32's precision count as changed (their float32 task vectors are 0)."""
    names = {n: f"{arch.prefix(i)}{n}.weight" for g in arch.require_input_groups() for n in g.names}
    return {
        n
        for n, full in names.items()
        if maps_zero_to_zero(plan_tensor(cfg, full, i, arch.num_layers, linear=True).method)
        and all(np.array_equal(m[full], base[full]) for m in models)
    }


def unchanged_record(record: dict[str, Any], tasks: int, t0: float) -> LayerRecord:
    """The report row of a tensor the rule above left as the base (`record`: its name, block, ... fields)."""
    return merged_record(record, MergeInfo("unchanged", None), [0.0] * tasks, t0)


def merged_record(
    record: dict[str, Any],
    info: MergeInfo,
    kept: list[float],
    t0: float,
    trim_error: list[float] | None = None,
    merge_error: float | None = None,
) -> LayerRecord:
    """One tensor's report row: `record`'s fields, what the merge did (`info`, kept fraction per
    model), the calibration errors (None without calibration), the time since `t0`."""
    return LayerRecord(
        **record,
        trim=info.trim,
        kept_density=kept,
        damping=info.damping,
        trim_error=trim_error,
        merge_error=merge_error,
        time_s=time.perf_counter() - t0,
    )


def task_vectors(b: np.ndarray, fts: Sequence[np.ndarray] | Callable[[int], np.ndarray], tasks: int) -> jax.Array:
    """`[T, ...]` float32 stack of `ft_t - b`, built in one buffer."""
    d = np.empty((tasks,) + b.shape, np.float32)
    for t in range(tasks):
        np.subtract(np.asarray(fts(t) if callable(fts) else fts[t], np.float32), b, out=d[t])
    return jax.device_put(d)  # zero-copy on CPU (jnp.asarray makes two copies here)
