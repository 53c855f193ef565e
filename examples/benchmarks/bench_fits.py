"""Benchmark: WUDI and RegMean (per-task Grams) against a data-free TIES merge of the same models.

    python examples/benchmarks/bench_fits.py [--cache DIR] [--layers 4] [--nsamples 16] [--seqlen 128]
        [--methods ties wudi regmean] [--repeats 1]

Makes (once, into --cache) a random LLaMA with 3 fine-tunes (`bench_scale.py`'s
generator: base + N(0, (0.01 rms)^2) deltas in bfloat16, some tensors left
untouched) at SmolLM2-like widths (hidden 576, intermediate 1536, vocab 4096;
`--layers` blocks) and a byte-level BPE tokenizer trained on this repository's
sources (`bench_merge.py`); each model's calibration text is its own 64 KB part
of them. Then, in ONE process, merges them through `run_merge` (the `sgtv
merge` path, `dtype: float32`): TIES (density 0.5, data-free), WUDI (data-free,
the defaults: 300 Adam steps), WUDI with `solver: exact`, RegMean with per-task
Grams (`hessian_source: per_task`, each model's own `--nsamples` x `--seqlen`
windows). Every method
runs once as a warm-up (compiles; its wall printed as `first s`), then
`--repeats` times (the median wall printed as `warm s`, the median process
CPU time as `cpu s`); ratios are of the warm runs against TIES'. The stage breakdown (load, calibrate, prune, merge,
export) is the last run's `merge_report.json`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale  # noqa: E402
from bench_merge import calibration_text, local_tokenizer  # noqa: E402

# SmolLM2-135M's widths (bench_scale's "small"), a small vocabulary, few blocks: merges of seconds on a CPU
SHAPE: dict[str, Any] = {**cast(dict, bench_scale.SHAPES["small"]), "vocab_size": 4096, "max_position_embeddings": 2048}
CALIB_CHARS = 1 << 16
METHODS = ("ties", "wudi", "wudi_exact", "regmean")


def family(cache: Path, layers: int) -> tuple[Path, list[Path], list[Path]]:
    """(base, three fine-tunes, each one's calibration text) under `cache` (made once)."""
    name = f"fits{layers}"
    bench_scale.SHAPES.setdefault(name, dict(SHAPE, num_hidden_layers=layers))
    base, fts = bench_scale.make_checkpoints(cache / name, name)
    text = calibration_text(cache)
    local_tokenizer(base, text, SHAPE["vocab_size"])
    calib = []  # disjoint 64 KB parts of the sources: a fine-tune's own text, tokenised whole by every run
    for t in range(len(fts)):
        calib.append(cache / f"calib_{t}.txt")
        if not calib[-1].is_file():
            calib[-1].write_text(text.read_text()[t * CALIB_CHARS : (t + 1) * CALIB_CHARS])
    return base, fts, calib


def configs(base: Path, fts: list[Path], calib: list[Path], nsamples: int, seqlen: int) -> dict[str, dict[str, Any]]:
    common: dict[str, Any] = {"base_model": str(base), "dtype": "float32", "seed": 0}
    wudi = [{"model": str(p)} for p in fts]
    return {
        "ties": {
            **common,
            "merge_method": "ties",
            "models": [{"model": str(p), "parameters": {"density": 0.5, "weight": 1.0}} for p in fts],
        },
        "wudi": {**common, "merge_method": "wudi", "models": wudi},
        "wudi_exact": {**common, "merge_method": "wudi", "models": wudi, "parameters": {"solver": "exact"}},
        "regmean": {
            **common,
            "merge_method": "regmean",
            "hessian_source": "per_task",
            "models": [
                {"model": str(p), "calibration": {"data": str(c), "nsamples": nsamples, "seqlen": seqlen}}
                for p, c in zip(fts, calib)
            ],
        },
    }


def merge_once(cfg: dict[str, Any], out: Path) -> tuple[float, float, dict[str, float]]:
    """Wall and process CPU seconds of one `run_merge` into `out`, and its report's stage times.

    On a shared machine the CPU seconds move less than the wall with the other load."""
    from sgtv_jax.pipeline.config import parse_config
    from sgtv_jax.pipeline.sequential import run_merge

    t0, c0 = time.perf_counter(), time.process_time()
    rep = run_merge(parse_config(cfg), out, overwrite=True, progress=False)
    return time.perf_counter() - t0, time.process_time() - c0, dict(rep.get("stages_s", {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sgtv-bench-fits"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import jax

    cache = Path(args.cache)
    base, fts, calib = family(cache, args.layers)
    cfgs = configs(base, fts, calib, args.nsamples, args.seqlen)
    rows: dict[str, tuple[float, float, float, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods:
            first = merge_once(cfgs[m], Path(tmp) / m)[0]
            warm = [merge_once(cfgs[m], Path(tmp) / m) for _ in range(args.repeats)]
            wall, cpu = statistics.median(r[0] for r in warm), statistics.median(r[1] for r in warm)
            rows[m] = (first, wall, cpu, warm[-1][2])
    dev = jax.devices()[0]
    print(
        f"\n3-way merge, {args.layers} LLaMA blocks of hidden 576 / intermediate 1536, vocab 4096, float32 out; "
        f"RegMean: {args.nsamples} x {args.seqlen} tokens per model; on {dev.platform} ({dev.device_kind})"
    )
    stages = ("load", "calibrate", "prune", "merge", "export")
    head = f"{'method':<11}{'first s':>9}{'warm s':>9}{'x ties':>8}{'cpu s':>9}{'x ties':>8}"
    print(head + "".join(f"{s:>10}" for s in stages))
    ref = rows["ties"][1:3] if "ties" in rows else (float("nan"), float("nan"))
    for m, (first, wall, cpu, st) in rows.items():
        ratios = f"{wall:>9.2f}{wall / ref[0]:>8.2f}{cpu:>9.2f}{cpu / ref[1]:>8.2f}"
        print(f"{m:<11}{first:>9.2f}{ratios}" + "".join(f"{st.get(s, 0.0):>10.2f}" for s in stages))


if __name__ == "__main__":
    main()
