"""Benchmark: what the recommended recipes cost against a data-free TIES merge of the same models.

    python examples/benchmarks/bench_recipe_cost.py [--work merge_quality_work] [--runs 3]
        [--rows recommended "recommended sparse"]

The merges of `examples/merge_quality.py` (seed 0's three SmolLM2-135M fine-tunes, made
there and cached in `--work`; made here if missing) as whole `sgtv merge CONFIG OUT`
processes, as a user runs them: each row's config (`merge_quality.config_for`, 32 x 64
calibration tokens per task, bfloat16 out) and `ties d=0.1` in turn, one round as a
warm-up (it fills sgtv's compilation cache, `sgtv_jax.pipeline.xla_cache`, in a folder of
this run), then `--runs` rounds, each row right after its TIES run. Prints per row the
median wall and CPU seconds of the process (`resource.getrusage` of the children) and the
median of the per-round ratios to TIES, the figures a shared machine lets us trust.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the benchmark's table
import merge_quality as mq  # noqa: E402

PEER = "ties d=0.1"


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s) of one process; raises when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--work", default="merge_quality_work", help="merge_quality.py's work folder (fine-tunes)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", nargs="+", default=["recommended", "recommended sparse"])
    args = ap.parse_args()
    prep = mq.prepare(Path(args.work).absolute(), 0, None)
    rows = mq.all_merges()
    with tempfile.TemporaryDirectory(prefix="sgtv-cost-") as tmp:
        env = {**os.environ, "SGTV_XLA_CACHE": str(Path(tmp) / "xla")}
        cmds: dict[str, list[str]] = {}
        for name in [PEER, *args.rows]:
            cfg = mq.config_for(rows[name], prep["fts"], prep["base"], prep["folder"], 32, 64)
            cfg["dtype"] = "bfloat16"
            path = Path(tmp) / f"{len(cmds)}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            cmds[name] = ["sgtv", "merge", str(path), str(Path(tmp) / f"out{len(cmds)}"), "--overwrite", "-q"]
        for cmd in cmds.values():  # warm-up: fills the compilation cache
            timed(cmd, env)
        got: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
        ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in args.rows}
        for _ in range(args.runs):
            for name in args.rows:
                peer = timed(cmds[PEER], env)
                own = timed(cmds[name], env)
                got[PEER].append(peer)
                got[name].append(own)
                ratios[name].append((own[0] / peer[0], own[1] / peer[1]))
    print(f"{'merge':<22} {'wall s':>8} {'cpu s':>8} {'wall / TIES':>12} {'cpu / TIES':>11}")
    for name, vals in got.items():
        wall, cpu = (statistics.median(v[i] for v in vals) for i in (0, 1))
        r = ratios.get(name)
        rw, rc = (f"{statistics.median(x[i] for x in r):.2f}x" for i in (0, 1)) if r else ("", "")
        print(f"{name:<22} {wall:8.1f} {cpu:8.1f} {rw:>12} {rc:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
