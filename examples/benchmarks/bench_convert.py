"""Benchmark: convert a sharded Hugging Face checkpoint; wall time and peak RSS vs sizes.

Builds a random LLaMA checkpoint (default ~310 MB fp32 in ~50 MB shards, written
with safetensors directly), then converts it in a fresh child process with
``convert.convert_to_hf`` and reports:

* checkpoint size and largest input shard, largest output shard
* wall time of the conversion
* peak RSS of the child (``resource.getrusage``), its RSS after imports, and
  the difference: the memory the conversion itself used

Target: the conversion's peak is at most the parameters being held plus one
input shard -- never the whole checkpoint. Export streams each tensor straight
into its shard file, so "held" is the largest tensor in flight (read, plus its
cast copy when the dtype changes), far less than one output shard.

    python examples/benchmarks/bench_convert.py                 # fp32 -> bf16
    python examples/benchmarks/bench_convert.py --dtype fp32 --size-layers 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MB = 10**6


def _llama_shapes() -> Callable[..., dict[str, tuple[int, ...]]]:
    """`llama_shapes(vocab, hidden, inter, layers, heads, kv)` of .ci/tiny_family.py (the one LLaMA shape table)."""
    spec = importlib.util.spec_from_file_location(
        "tiny_family", Path(__file__).resolve().parents[2] / ".ci" / "tiny_family.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.llama_shapes


def make_checkpoint(path: Path, layers: int, shard_mb: int) -> None:
    """Random fp32 LLaMA written shard by shard (never whole in memory)."""
    from safetensors.numpy import save_file

    cfg = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=16000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype="float32",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
    )
    shapes = _llama_shapes()(
        cfg["vocab_size"],
        cfg["hidden_size"],
        cfg["intermediate_size"],
        layers,
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        if groups[-1] and size + nbytes > shard_mb * MB:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (rng.standard_normal(shapes[n], dtype=np.float32) * 0.02) for n in names}
        total += sum(t.nbytes for t in tensors.values())
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in names}
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (path / "config.json").write_text(json.dumps(cfg))


def child(src: str, dst: str, dtype: str, out_shard: str) -> None:
    """Run one conversion and print its metrics as JSON (peak RSS of this process)."""
    import convert  # noqa: F401  (imports counted in the baseline)

    # Shape validation imports the name maps (jax, flax) and transformers' configs;
    # count those imports in the baseline, not in the conversion.
    import convert.namemaps  # noqa: F401
    from convert import convert_to_hf
    from convert.readers import hf_config_object, open_checkpoint

    hf_config_object({"model_type": "llama"})
    base = _rss_now()
    t0 = time.perf_counter()
    convert_to_hf(src, dst, dtype=dtype, max_shard_size=out_shard)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    open_checkpoint(dst).close()
    print(json.dumps({"wall_s": wall, "peak_rss": peak, "base_rss": base}))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-layers", type=int, default=4, help="decoder layers (4 -> ~310 MB fp32)")
    ap.add_argument("--shard-mb", type=int, default=50, help="input shard size, MB")
    ap.add_argument("--out-shard", default="100MB", help="output max_shard_size")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--workdir", default=None, help="where to build the checkpoint (default: a temp dir)")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.dtype, args.out_shard)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    src, dst = work / "src", work / "dst"
    try:
        make_checkpoint(src, args.size_layers, args.shard_mb)
        shards = sorted(src.glob("*.safetensors"))
        ckpt_bytes = sum(p.stat().st_size for p in shards)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(src),
            str(dst),
            "--dtype",
            args.dtype,
            "--out-shard",
            args.out_shard,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
        if res.returncode != 0:
            sys.exit(res.stderr)
        m = json.loads(res.stdout.strip().splitlines()[-1])
        out_shards = sorted(dst.glob("*.safetensors"))
        largest_in = max(p.stat().st_size for p in shards)
        largest_out = max(p.stat().st_size for p in out_shards)
        used = m["peak_rss"] - m["base_rss"]
        largest_tensor = max(int(np.prod(s)) for s in _llama_shapes()(16000, 1024, 2816, 1, 16, 4).values()) * 4
        held = largest_tensor * (1 + (0 if args.dtype == "fp32" else 0.5))
        target = held + largest_in
        print(f"checkpoint: {ckpt_bytes / MB:.1f} MB fp32 in {len(shards)} shards (largest {largest_in / MB:.1f} MB)")
        print(
            f"output:     {sum(p.stat().st_size for p in out_shards) / MB:.1f} MB {args.dtype} in "
            f"{len(out_shards)} shards (largest {largest_out / MB:.1f} MB)"
        )
        print(f"wall time:  {m['wall_s']:.2f} s ({ckpt_bytes / MB / m['wall_s']:.0f} MB/s read)")
        print(
            f"peak RSS:   {m['peak_rss'] / MB:.1f} MB (after imports {m['base_rss'] / MB:.1f} MB; "
            f"conversion used {used / MB:.1f} MB)"
        )
        print(
            f"target:     held tensors ({held / MB:.1f} MB) + one input shard ({largest_in / MB:.1f} MB) = "
            f"{target / MB:.1f} MB -> {'OK' if used <= target else 'OVER'}; conversion used "
            f"{used / ckpt_bytes:.2f}x the checkpoint, {used / (largest_out + largest_in):.2f}x "
            f"(largest output shard + largest input shard)"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
