"""The calibrated merge's peak-memory formula (`sgtv check`'s) for common model shapes, no checkpoints needed.

    python examples/benchmarks/memory_table.py [--tasks 3] [--nsamples 32] [--seqlen 512] [--batch-size 8]

A T-way TIES + SparseGPT merge (every linear layer pruned with its Hessian) for
the `merged` and `per_task` Hessian sources; the terms are those of
`sgtv_jax.pipeline.memory` (float32 working copies; the bf16 files on disk are
not held). KV heads and head widths are the published models' (grouped-query
attention: 8 KV heads).
"""

from __future__ import annotations

import argparse

from sgtv_jax.pipeline.memory import CalibrationShape, estimate_calibrated, llama_shapes

# name: (hidden, layers, intermediate, vocab, heads, kv heads, head dim); layers do not enter the formula
SHAPES = {
    "Llama-3.2-1B": (2048, 16, 8192, 128256, 32, 8, 64),
    "Llama-3.1-8B": (4096, 32, 14336, 128256, 32, 8, 128),
    "Llama-3.1-70B": (8192, 80, 28672, 128256, 64, 8, 128),
}
TERMS = ("activations", "attention", "hessians", "obs", "block", "outer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    T, calib = args.tasks, CalibrationShape(args.nsamples, args.seqlen)
    print(f"{T}-way TIES + SparseGPT, {args.nsamples} x {args.seqlen} calibration tokens, batch_size {args.batch_size}")
    print("\n| model | hessian_source | " + " | ".join(TERMS) + " | peak |")
    print("| --- | --- | " + " | ".join("---:" for _ in TERMS) + " | ---: |")
    for name, (hidden, _layers, inter, vocab, heads, kv, hd) in SHAPES.items():
        shapes = llama_shapes(hidden, inter, vocab, heads, kv_heads=kv, head_dim=hd)
        for source in ("merged", "per_task"):
            per_task = source == "per_task"
            est = estimate_calibrated(
                shapes, tasks=T, sets=[calib] * (T if per_task else 1), batch_size=args.batch_size, per_task=per_task
            )
            cells = " | ".join(f"{est.term(t).bytes / 2**30:.2f}" for t in TERMS)
            print(f"| {name} | {source} | {cells} | **{est.total / 2**30:.1f} GiB** |")


if __name__ == "__main__":
    main()
