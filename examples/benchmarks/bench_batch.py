"""Batch merging: a grid of TIES + sparsegpt settings in one compiled call vs eager calls.

    PYTHONPATH=. python examples/benchmarks/bench_batch.py [--rows 1536 --cols 576 --tasks 3]

64 settings (8 densities x 8 weight vectors) of one `[tasks, rows, cols]`
stack: `merge_grid` (one jit; the factor of H once, one OBS trim per density)
against 64 eager `ties(...)` calls (each factors H and trims every task).
Both sides are timed after a warm-up call (compilation excluded; reported
separately) and checked to agree.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax.hessian import hessian_finalize, hessian_init, hessian_update
from sgtv_jax.merge import Calibration, ties
from sgtv_jax.merge.batch import merge_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--densities", type=int, default=8)
    ap.add_argument("--weights", type=int, default=8)
    ap.add_argument(
        "--eager-calls", type=int, default=0, help="time only this many eager calls and extrapolate (0: all of them)"
    )
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 128, args.cols)).astype(np.float32)
    h = hessian_finalize(hessian_update(hessian_init(args.cols), x))
    stack = jnp.asarray(0.01 * rng.standard_normal((args.tasks, args.rows, args.cols)), jnp.float32)
    densities = np.linspace(0.05, 0.6, args.densities).round(3)
    weights = np.round(rng.uniform(0.3, 1.5, (args.weights, args.tasks)), 3).astype(np.float32)
    calib = Calibration(hessian=h)
    settings = [(i, j) for i in range(len(densities)) for j in range(len(weights))]
    kw = dict(trim="sparsegpt", calib=calib)

    def eager(i, j):
        return ties(stack, weights=[float(v) for v in weights[j]], densities=float(np.float32(densities[i])), **kw)

    # warm-up (compiles); compilation times reported separately
    t0 = time.perf_counter()
    jax.block_until_ready(eager(0, 0))
    eager_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = jax.block_until_ready(merge_grid("ties", stack, weights, densities, **kw))
    grid_first = time.perf_counter() - t0

    t0 = time.perf_counter()
    grid = jax.block_until_ready(merge_grid("ties", stack, weights, densities, **kw))
    grid_time = time.perf_counter() - t0

    timed = settings if args.eager_calls <= 0 else settings[: args.eager_calls]
    t0 = time.perf_counter()
    worst, differ = 0.0, 0
    for i, j in timed:
        out = jax.block_until_ready(eager(i, j))
        g = grid[i, j, 0]
        worst = max(worst, float(jnp.max(jnp.abs(out - g))))
        differ += int(jnp.sum((out == 0) != (g == 0)))
    eager_time = (time.perf_counter() - t0) * len(settings) / len(timed)

    print(
        f"stack {args.tasks}x{args.rows}x{args.cols}, {len(settings)} settings "
        f"({len(densities)} densities x {len(weights)} weight vectors), TIES + sparsegpt, "
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})"
    )
    print("| run | seconds | per setting (ms) |")
    print("| --- | ---: | ---: |")
    print(
        f"| {len(settings)} eager `ties` calls{' (extrapolated)' if timed is not settings else ''} "
        f"| {eager_time:.2f} | {1000 * eager_time / len(settings):.1f} |"
    )
    print(f"| one `merge_grid` call | {grid_time:.2f} | {1000 * grid_time / len(settings):.1f} |")
    print(
        f"speed-up {eager_time / grid_time:.1f}x; first calls (with compilation): eager "
        f"{eager_compile:.1f} s, grid {grid_first:.1f} s"
    )
    print(f"agreement over {len(timed)} settings: max |diff| {worst:.2e}, {differ} zero-pattern differences")


if __name__ == "__main__":
    main()
