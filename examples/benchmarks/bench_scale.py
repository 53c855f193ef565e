"""Benchmark: data-free merges at Llama-3.2-1B's shapes: wall, peak RSS and the memory formula.

    python examples/benchmarks/bench_scale.py [--small] [--cache DIR] [--ways 2 3]
        [--methods ties dare_ties task_arithmetic] [--tools plain sgtv mergekit] [--mergekit PATH] [--budget 256MiB]
        [--verify]

Makes (once, into --cache; kept between runs) a random LLaMA checkpoint with
Llama-3.2-1B's shapes (hidden 2048, 16 layers, intermediate 8192, vocab
128256, tied embeddings; bfloat16 safetensors in 1 GB shards; ~2.5 GB) and
three fine-tunes (base + N(0, (0.01 rms)^2) deltas rounded to bfloat16; every
fine-tune leaves some tensors untouched), written tensor by tensor. `--small`
uses SmolLM2-135M-like shapes instead (hidden 576, 30 layers, intermediate
1536, vocab 49152; well under 2 minutes).

Then runs, each in a fresh subprocess that reports its own wall time and peak
RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`: the whole process, imports
and JAX included), for every method (TIES, DARE-TIES, task arithmetic;
density 0.5, `dtype: bfloat16`) and number of models (2, 3):

* `plain`: read base + T models with safetensors (numpy), average them in
  float32, cast to bfloat16, write safetensors shards; tensor by tensor. The
  I/O floor of any merge, measured once per T in the same run.
* `sgtv`: `sgtv merge CONFIG OUT` with `memory_budget: --budget` (tensors
  over it merged in row chunks, outputs written chunk by chunk). `--verify`
  also runs it with no budget (whole tensors) and compares the outputs.
* `mergekit`: `mergekit-yaml CONFIG OUT --lazy-unpickle` (CPU) when `--mergekit PATH` names
  one or `mergekit-yaml` is on PATH (never required; e.g. mergekit 0.1.5 in its own venv).

Beside the measured peak: `sgtv check`'s memory formula (`pipeline.memory`,
the largest merge working set). The JAX runtime, the Python process and the
output chunk come on top.
`bytes_per_entry(T) = 12 + 20 T` float32 working bytes per entry of a chunk.
The input checkpoints are read with `readinto` (no memory map), so the page
cache does not count in RSS. Input files are read once before the runs
(page cache warm), so every tool reads from memory, not disk. Every run
(plain, streaming, sgtv) has glibc keep freed large blocks for reuse
(`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`; see
`streaming.reuse_freed_memory`): a fresh mapping per temporary costs more
page faults than arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        vocab_size=128256,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_scaling={
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    ),
    "small": dict(
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        vocab_size=49152,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(  # seconds on a CPU: bench_device.sh --quick
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=512,
        vocab_size=4096,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    ),
}
METHODS = ("ties", "dare_ties", "task_arithmetic")
GB = 1e9


# --------------------------------------------------------------------------- checkpoints


def llama_config(size: str) -> dict:
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
        initializer_range=0.02,
        **SHAPES[size],
    )


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of a tied-embedding LLaMA, in file order."""
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    return out + [("model.norm.weight", (h,))]


def untouched(name: str, t: int) -> bool:
    """Tensors fine-tune t leaves as the base: every norm of model 0, one v_proj in four, ..."""
    if t == 0 and "norm" in name:
        return True
    if "layers." in name:
        layer = int(name.split(".")[2])
        return layer % 4 == t and "v_proj" in name
    return False


def write_checkpoint(dst: Path, cfg: dict, tensors) -> None:
    """Write (name, bf16 array) pairs as 1 GB safetensors shards + index, one tensor in memory."""
    from convert.export import export_hf

    export_hf(tensors, dst, config=cfg, dtype="bf16", max_shard_size="1GB", fill_from_base=False)


def make_checkpoints(cache: Path, size: str, tasks: int = 3) -> tuple[Path, list[Path]]:
    import ml_dtypes

    from convert.readers import open_checkpoint

    cfg = llama_config(size)
    base = cache / "base"
    if not (base / "config.json").is_file():
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)

        def gen():
            for name, shape in tensor_shapes(cfg):
                if name.endswith("norm.weight"):
                    w = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
                else:
                    w = rng.standard_normal(shape, np.float32) * np.float32(0.02)
                yield name, w.astype(ml_dtypes.bfloat16)

        write_checkpoint(base, cfg, gen())
        print(f"generated {base} in {time.perf_counter() - t0:.0f} s", flush=True)
    fts = []
    for t in range(tasks):
        dst = cache / f"ft{t}"
        fts.append(dst)
        if (dst / "config.json").is_file():
            continue
        t0 = time.perf_counter()
        rng = np.random.default_rng(100 + t)
        with open_checkpoint(base) as b:

            def gen(b=b, rng=rng, t=t):
                for name in b.names():
                    w = b.get(name)
                    if untouched(name, t):
                        yield name, w
                        continue
                    w32 = w.astype(np.float32)
                    rms = float(np.sqrt(np.mean(np.square(w32[:64])))) + 1e-8
                    w32 += rng.standard_normal(w.shape, np.float32) * np.float32(0.01 * rms)
                    yield name, w32.astype(ml_dtypes.bfloat16)

            write_checkpoint(dst, cfg, gen())
        print(f"generated {dst} in {time.perf_counter() - t0:.0f} s", flush=True)
    return base, fts


def warm_page_cache(paths: list[Path]) -> None:
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def write_config(path: Path, method: str, base: Path, fts: list[Path], budget: str = "256MiB") -> Path:
    density = "" if method == "task_arithmetic" else ", density: 0.5"
    lines = ["models:"] + [f"  - model: {f}\n    parameters: {{weight: 1.0{density}}}" for f in fts]
    lines += [f"merge_method: {method}", f"base_model: {base}", "dtype: bfloat16", "max_shard_size: 1GB"]
    lines += [f"memory_budget: {budget}"]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- jobs (run in a child)


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plain_average(base: Path, fts: list[Path], out: Path) -> dict:
    """Read base + models tensor by tensor (safetensors, numpy), average in float32, write bfloat16."""
    import ml_dtypes
    from safetensors import safe_open

    from convert.safetensors_writer import StreamingSafetensorsWriter

    def weight_map(d: Path) -> dict[str, str]:
        if (d / "model.safetensors.index.json").is_file():
            return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
            return {k: "model.safetensors" for k in f.keys()}

    maps = {d: weight_map(d) for d in [base] + fts}
    r0 = rss_now()
    out.mkdir(parents=True, exist_ok=True)

    def read(d: Path, name: str) -> np.ndarray:
        with safe_open(str(d / maps[d][name]), framework="numpy") as f:  # unmapped again at once
            return f.get_tensor(name)

    writers: dict[str, StreamingSafetensorsWriter] = {}
    for name, shard in sorted(maps[base].items(), key=lambda kv: kv[1]):  # shard by shard
        acc = read(base, name).astype(np.float32)
        for d in fts:
            acc += read(d, name).astype(np.float32)
        acc /= np.float32(len(fts) + 1)
        if shard not in writers:
            writers[shard] = StreamingSafetensorsWriter(out / shard, metadata={"format": "pt"})
        writers[shard].add(name, acc.astype(ml_dtypes.bfloat16))
    for w in writers.values():
        w.close()
    return {"rss_after_imports": r0}


def formula_bytes(config: Path) -> int:
    """`sgtv check`'s memory formula for `config` (the largest merge working set), in bytes."""
    from sgtv_jax.pipeline.config import load_config
    from sgtv_jax.pipeline.memory import estimate_memory

    return estimate_memory(load_config(config)).total


def sgtv_merge(config: Path, out: Path) -> dict:
    from sgtv_jax.cli import main

    rc = main(["merge", str(config), str(out), "--quiet", "--overwrite", "--force"])
    if rc:
        raise SystemExit(rc)
    rep = json.loads((out / "merge_report.json").read_text())
    return {"stages_s": rep.get("stages_s")}


def child(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if args.child == "plain":
        info = plain_average(Path(args.base), [Path(p) for p in args.fts], Path(args.out))
    else:
        info = sgtv_merge(Path(args.config), Path(args.out))
    info["wall_s"] = time.perf_counter() - t0
    info["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(info), flush=True)


# --------------------------------------------------------------------------- driver


def same_tensors(a: Path, b: Path) -> str:
    """'identical' when two HF directories hold the same tensors bit for bit, else the first difference."""
    from convert.readers import open_checkpoint

    with open_checkpoint(a) as x, open_checkpoint(b) as y:
        if sorted(x.names()) != sorted(y.names()):
            return "different tensor names"
        for n in x.names():
            p, q = x.get(n), y.get(n)
            if p.dtype != q.dtype or p.shape != q.shape or p.tobytes() != q.tobytes():
                return f"differ in {n}"
    return "identical"


# Every run keeps freed large blocks in malloc's heap (no page faults per temporary);
# `sgtv_jax.merge.streaming.reuse_freed_memory` does the same from inside a program.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}


def run_child(argv: list[str], out: Path, keep: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **MALLOC_ENV)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"], "wall_s": wall}
    res = json.loads(line[-1][7:])
    res["process_wall_s"] = wall
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


def mergekit_config(config: Path) -> Path:
    """`config` without sgtv's own keys (`memory_budget`), which mergekit's schema rejects."""
    lines = [ln for ln in config.read_text().splitlines() if not ln.startswith("memory_budget:")]
    out = config.with_name(config.stem + "-mergekit.yaml")
    out.write_text("\n".join(lines) + "\n")
    return out


def run_mergekit(mergekit_yaml: str, config: Path, out: Path) -> dict:
    """`mergekit-yaml CONFIG OUT` (CPU, lazy unpickling) under `/usr/bin/time -v`: wall and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", mergekit_yaml, str(mergekit_config(config)), str(out), "--lazy-unpickle", "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **MALLOC_ENV))
    wall = time.perf_counter() - t0
    peak = [ln for ln in p.stderr.splitlines() if "Maximum resident set size" in ln]
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode or not peak:
        return {"error": p.stderr.strip().splitlines()[-1:], "wall_s": wall}
    return {"wall_s": wall, "peak_rss": int(peak[0].split()[-1]) * 1024}


def find_mergekit(given: str | None) -> str | None:
    """The `mergekit-yaml` to run: `--mergekit PATH`, else one on PATH, else None (not measured)."""
    if given:
        if not (os.path.isfile(given) and os.access(given, os.X_OK)):
            raise SystemExit(f"--mergekit {given}: not an executable file")
        return given
    return shutil.which("mergekit-yaml")


def parse_size(s: str) -> int:
    from convert.export import parse_size as ps

    return ps(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="SmolLM2-135M-like shapes instead of Llama-3.2-1B")
    ap.add_argument("--cache", default=None, help="checkpoint cache (default /tmp/sgtv-bench-scale-<size>)")
    ap.add_argument("--ways", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--tools",
        nargs="+",
        default=["plain", "sgtv", "mergekit"],
        choices=["plain", "sgtv", "mergekit"],
    )
    ap.add_argument(
        "--mergekit",
        default=None,
        metavar="PATH",
        help="the mergekit-yaml executable to compare with (default: mergekit-yaml on PATH; skipped when absent)",
    )
    ap.add_argument("--budget", default="256MiB", help="sgtv's memory_budget (default 256MiB)")
    ap.add_argument(
        "--verify",
        action="store_true",
        help="also run sgtv merge with no budget (whole tensors: much more memory) and compare outputs bit for bit",
    )
    ap.add_argument("--child", choices=["plain", "sgtv"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--fts", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    size = "small" if args.small else "1b"
    cache = Path(args.cache or f"/tmp/sgtv-bench-scale-{size}")
    cache.mkdir(parents=True, exist_ok=True)
    base, fts = make_checkpoints(cache, size)
    warm_page_cache([base] + fts)
    work = cache / "work"
    work.mkdir(exist_ok=True)
    mergekit = find_mergekit(args.mergekit) if "mergekit" in args.tools else None
    rows, verified = [], []
    for T in args.ways:
        plain = None
        if "plain" in args.tools:
            plain = run_child(
                ["--child", "plain", "--base", str(base), "--fts", *map(str, fts[:T]), "--out", str(work / "plain")],
                work / "plain",
            )
            rows.append((f"{T}-way", "read+average+write", plain, None))
            print(rows[-1], flush=True)
        for method in args.methods:
            config = write_config(work / f"{method}-{T}.yaml", method, base, fts[:T], args.budget)
            if "sgtv" in args.tools:
                argv = ["--child", "sgtv", "--config", str(config), "--out", str(work / "sgtv")]
                res = run_child(argv, work / "sgtv", keep=args.verify)
                rows.append((f"{T}-way {method}", "sgtv", res, formula_bytes(config)))
                print(rows[-1], flush=True)
                if args.verify:
                    whole = write_config(work / f"{method}-{T}-whole.yaml", method, base, fts[:T], "1TB")
                    argv = ["--child", "sgtv", "--config", str(whole), "--out", str(work / "whole")]
                    rows.append((f"{T}-way {method}", "sgtv, no budget", run_child(argv, work / "whole", True), None))
                    verdict = same_tensors(work / "sgtv", work / "whole")
                    verified.append(f"{T}-way {method}: budget {args.budget} vs no budget: outputs {verdict}")
                    print(verified[-1], flush=True)
            for tool in ("sgtv", "whole"):
                shutil.rmtree(work / tool, ignore_errors=True)
            if mergekit:
                rows.append((f"{T}-way {method}", "mergekit", run_mergekit(mergekit, config, work / "mergekit"), None))
                print(rows[-1], flush=True)
        for label, _tool, res, _formula in rows:
            if label.startswith(f"{T}-way") and plain and "error" not in plain and "error" not in res:
                res["x_plain"] = res["wall_s"] / plain["wall_s"]
    print(f"\n{size} shapes, budget {args.budget}, CPU cores: {os.cpu_count()}, mergekit: {mergekit or 'not found'}")
    print("| run | tool | wall s | x plain | peak RSS GB | formula GB | RSS after imports GB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, tool, res, formula in rows:
        if "error" in res:
            print(f"| {label} | {tool} | failed: {res['error']} | | | | |")
            continue
        xp = f"{res['x_plain']:.2f}" if "x_plain" in res else ""
        fm = f"{formula / GB:.2f}" if formula else ""
        r0 = f"{res['rss_after_imports'] / GB:.2f}" if "rss_after_imports" in res else ""
        print(f"| {label} | {tool} | {res['wall_s']:.1f} | {xp} | {res['peak_rss'] / GB:.2f} | {fm} | {r0} |")
    for line in verified:
        print(line)


if __name__ == "__main__":
    main()
