"""Benchmark: 3-way merge, TIES + SparseGPT vs magnitude TIES, with the calibrate stage's GFLOP/s.

    python examples/benchmarks/bench_merge.py [--work DIR] [--nsamples 64] [--seqlen 512]
        [--model smollm2|tiny|small|1b] [--methods sparsegpt magnitude] [--json FILE]

`--model smollm2` (default) makes three fine-tune-like models from
SmolLM2-135M-Instruct (base + a low-rank-plus-noise task vector in every
tensor, about 1% of each tensor's scale; the merge cost does not depend on how
the deltas were made). `tiny` / `small` / `1b` use `bench_scale.py`'s random
LLaMA checkpoints (bfloat16; `1b`: Llama-3.2-1B's shapes) with a byte-level BPE
tokenizer trained here on the calibration text: nothing is downloaded, so it
runs on a machine without network. The calibration text is this repository's
Python sources. Each merge runs as `sgtv merge` in a fresh process (so peak RSS
is the merge's own); we print the stage breakdown (load, calibrate, prune,
merge, export), wall time and peak RSS from each merge's `merge_report.json`.
Targets (2-core CPU, SmolLM2): TIES + SparseGPT <= 6 min and <= 2.5 GB peak RSS.

The calibrate stage's achieved rate comes from the merge's own report
(`merge_report.json`'s "calibrate": its FLOP count, `sgtv_jax.pipeline.calib_rate`,
and a small matmul timed inside the merge); we print it beside a float32
1024x1024 `jnp.dot` measured in this process before and after the merges. The
ratio `calibrate s / (FLOPs / matmul rate)` is how far the stage is from its
FLOP count; the rest is attention (not counted), the tokenizer, element-wise
work, copies and dispatch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import llama_config, make_checkpoints  # noqa: E402

from sgtv_jax.pipeline.calib_rate import matmul_gflops  # noqa: E402


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


def local_tokenizer(dst: Path, text: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on `text`, saved into the model directory `dst` (once)."""
    if (dst / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(text)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(str(dst))


def models_for(name: str, work: Path, calib: Path) -> tuple[Path, list[Path], dict]:
    """(base, three fine-tunes, HF config) for `--model`."""
    if name == "smollm2":
        from convert import fetch_smollm2

        base = fetch_smollm2()
        return base, make_finetunes(base, work), json.loads((base / "config.json").read_text())
    cfg = llama_config(name)
    base, fts = make_checkpoints(Path(f"/tmp/sgtv-bench-scale-{name}"), name)
    local_tokenizer(base, calib, min(4096, cfg["vocab_size"]))
    return base, fts, cfg


def run(cfg: dict, work: Path, name: str) -> dict:
    import yaml

    (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = work / f"out_{name}"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sgtv_jax.cli", "merge", str(work / f"{name}.yaml"), str(out), "--overwrite", "--quiet"],
        check=True,
        env=env,
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
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "small", "1b"])
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "magnitude"], choices=["sparsegpt", "magnitude"])
    ap.add_argument("--json", help="also write the results here (default WORK/bench_merge.json)")
    args = ap.parse_args()

    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    calib = calibration_text(work)
    base, fts, _ = models_for(args.model, work, calib)
    rate = matmul_gflops(reps=20)
    common = {
        "models": [{"model": str(p), "parameters": {"density": 0.1, "weight": 1.0}} for p in fts],
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    sparsegpt = {
        **common,
        "trim": "sparsegpt",
        "hessian_source": "merged",
        "calibration": {"data": str(calib), "nsamples": args.nsamples, "seqlen": args.seqlen},
    }
    configs = {"ties+sparsegpt": ("sparsegpt", sparsegpt), "ties (magnitude)": ("magnitude", common)}
    results, formulas = {}, {}
    for label, (key, cfg) in configs.items():
        if key in args.methods:
            results[label] = run(cfg, work, key)
            formulas[label] = formula_mib(work / f"{key}.yaml")
    rate = (rate + matmul_gflops(reps=20)) / 2  # before and after the merges: the machine's state may drift
    stages = ("load", "calibrate", "prune", "merge", "export")
    dev = jax.devices()[0]
    print(
        f"\n3-way {args.model} merge, density 0.1, {args.nsamples} x {args.seqlen} calibration tokens, "
        f"on {dev.platform} ({dev.device_kind}); 1024x1024 float32 jnp.dot: {rate:.1f} GFLOP/s"
    )
    print(
        f"{'method':<18}" + "".join(f"{s:>10}" for s in stages) + f"{'wall s':>10}{'peak MiB':>10}{'formula MiB':>12}"
    )
    for k, r in results.items():
        print(
            f"{k:<18}"
            + "".join(f"{r['stages_s'].get(s, 0.0):>10.1f}" for s in stages)
            + f"{r['process_wall_s']:>10.1f}{r['peak_rss_mb']:>10.0f}{formulas[k]:>12.0f}"
        )
    summary = {
        "device": f"{dev.platform} {dev.device_kind}",
        "model": args.model,
        "matmul_gflops": rate,
        "runs": {
            k: {
                "stages_s": r["stages_s"],
                "wall_s": r["process_wall_s"],
                "peak_rss_mb": r["peak_rss_mb"],
                "formula_mib": formulas[k],
            }
            for k, r in results.items()
        },
    }
    if "ties+sparsegpt" in results:
        c = results["ties+sparsegpt"]["calibrate"]  # the merge's own count and in-run matmul rate
        fwd, hess, cal = c["forward_gflop"] * 1e9, c["hessian_gflop"] * 1e9, c["seconds"]
        floor = (fwd + hess) / (rate * 1e9)
        summary["calibrate"] = {
            "tokens": c["token_positions"],
            "forward_gflop": fwd / 1e9,
            "hessian_gflop": hess / 1e9,
            "seconds": cal,
            "gflops": c["gflops"],
            "flop_floor_s": floor,
            "x_floor": cal / floor,
            "in_run_matmul_gflops": c["matmul_gflops"],
            "in_run_x_flop_count": c["x_flop_count"],
        }
        print(
            f"calibrate: {c['token_positions']} tokens, forward {fwd / 1e9:.1f} + Hessian {hess / 1e9:.1f} GFLOP in "
            f"{cal:.1f} s = {c['gflops']:.1f} GFLOP/s; at the matmul rate {floor:.1f} s: {cal / floor:.2f}x its FLOP "
            f"count (in the merge's own report: {c['x_flop_count']:.2f}x at {c['matmul_gflops']:.1f} GFLOP/s)"
        )
    Path(args.json or work / "bench_merge.json").write_text(json.dumps(summary, indent=1))


def formula_mib(config: Path) -> float:
    """`sgtv check`'s peak-memory formula for `config`, MiB (headers only)."""
    from sgtv_jax.pipeline.config import load_config
    from sgtv_jax.pipeline.memory import estimate_memory

    return estimate_memory(load_config(config)).total / 2**20


if __name__ == "__main__":
    main()
