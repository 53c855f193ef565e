"""Benchmark: 3-way SmolLM2-135M merge, TIES + SparseGPT vs magnitude TIES, on this CPU.

    python examples/benchmarks/bench_merge.py [--work DIR] [--nsamples 64] [--seqlen 512]

Makes three fine-tune-like models from SmolLM2-135M-Instruct (base + a
low-rank-plus-noise task vector in every tensor, about 1% of each tensor's
scale; the merge cost does not depend on how the deltas were made), writes a
calibration text (this repository's Python sources), then runs each merge as
`sgtv merge` in a fresh process (so peak RSS is the merge's own) and prints the
stage breakdown (load, calibrate, prune, merge, export), wall time and peak RSS
from each merge's `merge_report.json`. Targets (2-core CPU): TIES + SparseGPT
<= 6 min and <= 2.5 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def perturbed(ckpt, rng: np.random.Generator):
    """Yield ``(name, w + delta)`` per tensor: a low-rank-plus-noise delta at ~1% of the tensor's scale."""
    for name in ckpt.names():
        w = np.asarray(ckpt.get(name), np.float32)
        scale = 0.01 * float(np.sqrt(np.mean(w**2)) + 1e-8)
        if w.ndim == 2:
            r, c = w.shape
            d = rng.standard_normal((r, 4), np.float32) @ rng.standard_normal(
                (4, c), np.float32
            ) / 2 + 0.5 * rng.standard_normal((r, c), np.float32)
        else:
            d = rng.standard_normal(w.shape, np.float32)
        yield name, w + scale * d


def make_finetunes(base: Path, work: Path, tasks: int = 3) -> list[Path]:
    from convert import export_hf, open_checkpoint

    out = []
    for t in range(tasks):
        dst = work / f"ft{t}"
        out.append(dst)
        if dst.is_dir():
            continue
        with open_checkpoint(base) as ckpt:
            export_hf(perturbed(ckpt, np.random.default_rng(t)), dst, base=ckpt, dtype="fp32")
    return out


def calibration_text(work: Path) -> Path:
    p = work / "calibration.txt"
    if not p.is_file():
        srcs = sorted((ROOT / "sgtv_jax").rglob("*.py")) + sorted((ROOT / "convert").rglob("*.py"))
        p.write_text("\n\n".join(s.read_text() for s in srcs))
    return p


def run(cfg: dict, work: Path, name: str) -> dict:
    import yaml

    (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = work / f"out_{name}"
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sgtv_jax.cli", "merge", str(work / f"{name}.yaml"), str(out), "--overwrite", "--quiet"],
        check=True,
    )
    wall = time.perf_counter() - t0
    rep = json.loads((out / "merge_report.json").read_text())
    rep["process_wall_s"] = wall
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_merge_work")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    from convert import fetch_smollm2

    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    base = fetch_smollm2()
    fts = make_finetunes(base, work)
    calib = calibration_text(work)
    common = {
        "models": [{"model": str(p), "parameters": {"density": 0.1, "weight": 1.0}} for p in fts],
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    results = {
        "ties+sparsegpt": run(
            {
                **common,
                "trim": "sparsegpt",
                "hessian_source": "merged",
                "calibration": {"data": str(calib), "nsamples": args.nsamples, "seqlen": args.seqlen},
            },
            work,
            "sparsegpt",
        ),
        "ties (magnitude)": run(common, work, "magnitude"),
    }
    stages = ("load", "calibrate", "prune", "merge", "export")
    print(f"\n3-way SmolLM2-135M merge, density 0.1, {args.nsamples} x {args.seqlen} calibration tokens")
    print(f"{'method':<18}" + "".join(f"{s:>10}" for s in stages) + f"{'wall s':>10}{'peak MiB':>10}")
    for k, r in results.items():
        print(
            f"{k:<18}"
            + "".join(f"{r['stages_s'][s]:>10.1f}" for s in stages)
            + f"{r['process_wall_s']:>10.1f}{r['peak_rss_mb']:>10.0f}"
        )
    (work / "bench_merge.json").write_text(
        json.dumps(
            {
                k: {"stages_s": r["stages_s"], "wall_s": r["process_wall_s"], "peak_rss_mb": r["peak_rss_mb"]}
                for k, r in results.items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
