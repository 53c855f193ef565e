"""The calibrate stage against its FLOP count: `merge_report.json`'s `"calibrate"` entry.

Per block, with `n` the token positions one pass over the calibration streams
runs (real windows x sequence length, every stream), `P` the block's linear
weights (sum of out x in) and `cols` each input group's input features:

    forward = passes * 2 * P * n     one capture pass (`base`, `per_task`: its output moves
                                     the streams on); two for `merged` / `per_task_merged`
                                     (the capture through base block i, then the merged block)
    hessian = sum over input groups of 2 * n * cols^2

Not counted: attention's score and value products, norms, activations, the
embeddings and the tokenizer (MoE blocks are counted as if every expert saw
every token). `matmul_gflops` times a float32 `n x n` `jnp.dot` in the same
run, so `x_flop_count` (calibrate seconds / (FLOPs / that rate)) is how far
the stage is from its FLOP count on this machine, whatever its load.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sgtv_jax.models.groups import InputGroup


def block_flops(
    linear: Mapping[str, tuple[int, int]], groups: Sequence[InputGroup], tokens: int, propagates: bool
) -> tuple[int, int]:
    """(forward, hessian) FLOPs of one block's calibration over `tokens` token positions (module doc).

    linear: HF-local name -> (weight entries out x in, input features) of the block's
    calibrated linear layers; groups: the block's input groups (names not in `linear` are skipped);
    propagates: a merged source (a second pass runs the merged block).
    """
    params = sum(size for size, _ in linear.values())
    forward = (2 if propagates else 1) * 2 * tokens * params
    hessian = sum(2 * tokens * linear[g.names[0]][1] ** 2 for g in groups if g.names[0] in linear)
    return forward, hessian


def matmul_gflops(n: int = 1024, reps: int = 3) -> float:
    """This run's dense float32 rate on the default device: median of `reps` jitted `n x n` `jnp.dot`s, GFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[reps // 2] / 1e9


def calibrate_summary(forward: float, hessian: float, tokens: int, seconds: float, rate: float) -> dict[str, Any]:
    """The report's `"calibrate"` entry: FLOP count, achieved GFLOP/s, the matmul rate and their ratio."""
    flops = forward + hessian
    gflops = flops / seconds / 1e9 if seconds > 0 else 0.0
    return {
        "token_positions": tokens,
        "forward_gflop": forward / 1e9,
        "hessian_gflop": hessian / 1e9,
        "seconds": seconds,
        "gflops": gflops,
        "matmul_gflops": rate,
        "x_flop_count": rate / gflops if gflops > 0 else None,
    }
