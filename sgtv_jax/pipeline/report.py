"""What a merge reports: per-tensor rows, stage times, reconstruction errors, and their plot.

`merge_report.json` holds the config, the time per stage (`StageTimer`), the
peak RSS and one `LayerRecord` per tensor: kept density per task, the damping
OBS used, the relative reconstruction error of each trimmed task vector
`tr(E H E^T) / tr(D H D^T)` (E = trimmed - D) and the merge's error against
the task-arithmetic target `sum_t w_t D_t` (`relative_errors`), and for each
calibrated linear layer the tokens its Hessian saw (`hessian_tokens`; a
routed expert: those routed to it) and whether it fell back to the all-token
Hessian (`hessian_fallback`, experts given too few tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend stays as it is

STAGES = ("load", "calibrate", "prune", "merge", "export")
REPORT_FILE = "merge_report.json"
PLOT_FILE = "merge_layer_error.png"


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StageTimer:
    """Seconds spent per stage: `with timer("calibrate"): ...` adds the block's wall time."""

    def __init__(self) -> None:
        self.stages = {s: 0.0 for s in STAGES}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[stage] += time.perf_counter() - t0


@dataclasses.dataclass
class LayerRecord:
    """One report row (a tensor). Lists are per fine-tuned model."""

    name: str
    block: int | None
    linear: bool
    shape: tuple[int, ...]
    trim: str | None
    density: list[float]
    kept_density: list[float]
    damping: float | None
    trim_error: list[float] | None
    merge_error: float | None
    time_s: float
    # Calibrated linear layers, per Hessian stream (one; per_task: one per model): the real
    # calibration tokens in its H (a routed expert: those routed to it), and whether an expert
    # given fewer than the minimum fell back to the unweighted all-token H (pipeline.streams).
    hessian_tokens: list[int] | None = None
    hessian_fallback: list[bool] | None = None


@jax.jit
def kept_densities(trimmed: jax.Array) -> jax.Array:
    """Fraction of nonzero entries of each task's tensor: `[T]` from `trimmed` `[T, ...]`.

    One program and one transfer per tensor (the report's `kept_density`), each
    task's value exactly the eager `jnp.mean(trimmed[t] != 0)` (tests/pipeline/test_relative_errors.py).
    """
    return jnp.stack([jnp.mean(trimmed[t] != 0) for t in range(trimmed.shape[0])])


@jax.jit
def relative_errors(
    deltas: jax.Array, trimmed: jax.Array | None, merged: jax.Array, weights: jax.Array, hessian: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Relative output errors under H: per task `tr(E H E^T)/tr(D H D^T)`, and of the merge.

    deltas, trimmed `[T, rows, cols]` (trimmed None: the merge did not trim, every
    trim error is 0 and costs no product); merged `[rows, cols]`; weights `[T]`;
    hessian `[cols, cols]` or `[T, cols, cols]`. Returns (`[T]`, scalar).
    """
    hp = jax.lax.Precision.HIGHEST
    h = hessian if hessian.ndim == 3 else jnp.broadcast_to(hessian, (deltas.shape[0],) + hessian.shape)

    def quad(a, hh):
        return jnp.sum(jnp.matmul(a, hh, precision=hp) * a)

    if trimmed is None:  # E = 0: the products would give 0 / den = 0 exactly
        trim_err = jnp.zeros(deltas.shape[0], merged.dtype)
    else:
        num = jax.vmap(quad)(trimmed - deltas, h)
        den = jax.vmap(quad)(deltas, h)
        trim_err = num / jnp.maximum(den, 1e-30)
    target = jnp.tensordot(weights, deltas, axes=1)
    hm = jnp.mean(h, axis=0)
    merge_err = quad(merged - target, hm) / jnp.maximum(quad(target, hm), 1e-30)
    return trim_err, merge_err


def jsonable(x: Any) -> Any:
    """`x` with tuples as lists, NumPy scalars as Python numbers and keys as strings."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def with_export_time(report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Set `wall_s`, the `export` stage (the wall time no other stage accounts for) and the peak RSS."""
    stages = report["stages_s"]
    report["wall_s"] = wall_s
    stages["export"] = max(0.0, wall_s - sum(v for k, v in stages.items() if k != "export"))
    report["peak_rss_mb"] = peak_rss_mb()
    return report


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """PNG of the per-layer relative reconstruction error (trim error per task, merge error)."""
    rows = [r for r in report["layers"] if r["trim_error"] is not None]
    fig = Figure(figsize=(max(6, len(rows) * 0.08), 4))
    ax = fig.subplots()
    if rows:
        x = np.arange(len(rows))
        te = np.asarray([r["trim_error"] for r in rows])
        for t in range(te.shape[1]):
            ax.plot(x, te[:, t], ".-", lw=0.8, label=f"trim error, model {t}")
        ax.plot(x, [r["merge_error"] for r in rows], "k.-", lw=0.8, label="merge error vs sum w_t D_t")
        ax.set_yscale("log")
        ax.set_xlabel("linear layer (in block order)")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no calibration data: no reconstruction errors", ha="center", va="center")
    ax.set_ylabel("relative reconstruction error")
    ax.set_title(f"{report['config']['merge_method']} ({report['hessian_source']} Hessians)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
