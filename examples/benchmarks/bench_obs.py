"""Benchmark: the compiled OBS prune against a plain PyTorch implementation.

The PyTorch peer is the SparseGPT reference's algorithm as it is usually
written (cholesky -> cholesky_inverse -> cholesky, a Python loop over columns,
sort-threshold mask), defined here so both run in one process on the same
inputs, interleaved; we report medians and the JAX/PyTorch time ratio, and the
achieved GFLOP/s beside a dense matmul measured in the same run.

    python examples/benchmarks/bench_obs.py            # default shapes
    python examples/benchmarks/bench_obs.py --large    # adds 4096x11008
    python examples/benchmarks/bench_obs.py --shapes 4096x4096,4096x11008 --no-torch --json obs.json

FLOP count (nominal, what the algorithm needs): T * rows * cols^2 for the sweep
plus 2/3 cols^3 for the factor; dense matmul: 2 * rows * cols^2.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax import obs_prune

try:
    import torch
except ImportError:  # the peer is optional
    torch = None


def torch_sparsegpt(w, h, density, blocksize=128, percdamp=0.01):
    """The reference algorithm, column loop and all (float32)."""
    w = w.clone()
    h = h.clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        tmp = w1**2 / torch.diag(hinv1).reshape((1, -1)) ** 2
        k = round((1 - density) * tmp.numel())
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        mask1.view(-1)[torch.argsort(tmp.flatten(), stable=True)[:k]] = True
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


def inputs(rows, cols, tasks, seed=0):
    rng = np.random.default_rng(seed)
    rank = max(8, cols // 4)
    x = rng.standard_normal((2048, rank)) @ rng.standard_normal((rank, cols))
    x += 0.1 * rng.standard_normal(x.shape)
    h = (2 / 16) * (x.T @ x)
    d = rng.standard_normal((tasks, rows, cols)) * 1e-2
    return d.astype(np.float32), h.astype(np.float32)


def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds per function, run round-robin so machine noise hits all alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            # Both runtimes keep worker threads spinning briefly after a call;
            # let them go idle so neither times the other's spin-down.
            time.sleep(0.25)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_shape(rows: int, cols: int, args: argparse.Namespace) -> list[dict]:
    """Time OBS (1 and 4 tasks), the matmul roofline and torch on one ``[rows, cols]`` shape.

    Prints a row per T and returns them as dicts (seconds, GFLOP/s)."""
    d4, h = inputs(rows, cols, 4)
    hj = jnp.asarray(h)
    a = jnp.asarray(d4[0])
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
    one_task = jnp.asarray(d4[0])
    four_tasks = jnp.asarray(d4)
    fns = {
        "jax1": lambda: obs_prune(one_task, hj, density=args.density)[0].block_until_ready(),
        "jax4": lambda: obs_prune(four_tasks, hj, density=args.density)[0].block_until_ready(),
        "matmul": lambda: matmul(a, hj).block_until_ready(),
    }
    if args.refit:
        fns["refit1"] = lambda: obs_prune(one_task, hj, density=args.density, refit=True)[0].block_until_ready()
    if torch is not None and not args.no_torch:
        tw, th = torch.from_numpy(d4[0]), torch.from_numpy(h)
        fns["torch1"] = lambda: torch_sparsegpt(tw, th, args.density)
    med = interleaved(fns, args.reps)
    matmul_gflops = 2 * rows * cols * cols / med["matmul"] / 1e9
    out = []
    for t in (1, 4):
        flops = t * rows * cols**2 + 2 / 3 * cols**3
        jt = med[f"jax{t}"]
        tt = med.get("torch1", math.nan) * (t if t == 1 else math.nan)
        gf = flops / jt / 1e9
        out.append({"rows": rows, "cols": cols, "tasks": t, "jax_s": jt, "gflops": gf, "matmul_gflops": matmul_gflops})
        print(
            f"{rows:>5} x {cols:<5} {t:>2} {jt:8.3f} {tt:8.3f} {jt / tt:6.2f} {gf:8.1f} {matmul_gflops:15.1f} {100 * gf / matmul_gflops:10.0f}%"
        )
    out[1]["x_one_task"] = med["jax4"] / med["jax1"]
    if args.refit:
        out[0]["refit_x_obs"] = med["refit1"] / med["jax1"]
    print(
        f"{'':>15} T=4 / T=1 time: {med['jax4'] / med['jax1']:.2f}x"
        + (
            f"; refit+OBS / OBS: {med['refit1'] / med['jax1']:.2f}x"
            # the refit's own time in units of one [rows, cols] x [cols, cols] product (one CG step)
            f" (refit = {(med['refit1'] - med['jax1']) / med['matmul']:.1f} matmuls, OBS = {med['jax1'] / med['matmul']:.1f})"
            if args.refit
            else ""
        )
    )
    return out


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,4096x11008"`` -> ``[(4096, 4096), (4096, 11008)]`` (rows x cols)."""
    try:
        return [(int(r), int(c)) for r, c in (s.lower().split("x") for s in text.split(",") if s)]
    except ValueError:
        raise SystemExit(f"--shapes: expected ROWSxCOLS[,ROWSxCOLS...], got {text!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--large", action="store_true", help="also 4096x11008")
    ap.add_argument("--refit", action="store_true", help="also time OBS + refit")
    ap.add_argument("--shapes", type=parse_shapes, help="ROWSxCOLS,... instead of the default shapes")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer (slow at large shapes)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    shapes = args.shapes or [(1536, 576), (576, 1536), (4096, 4096)] + ([(4096, 11008)] if args.large else [])
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}); torch {torch.__version__ if torch else 'absent'}"
    )
    header = f"{'rows x cols':>12} {'T':>2} {'jax s':>8} {'torch s':>8} {'ratio':>6} {'GFLOP/s':>8} {'matmul GFLOP/s':>15} {'% of matmul':>11}"
    print(header)
    table = [r for rows, cols in shapes for r in bench_shape(rows, cols, args)]
    if args.json:
        Path(args.json).write_text(json.dumps({"device": f"{dev.platform} {dev.device_kind}", "rows": table}, indent=1))


if __name__ == "__main__":
    main()
