"""Declaring a subcommand of `sgtv` / `python -m convert` in one call, and the flags several share.

A leaf like `sgtv_jax.guard`: it imports no job module. Each command module's
`add_parser(subparsers)` calls `subcommand(...)` once per subcommand; its
`run` function imports the job's (heavy) module itself, only when it runs, so
`sgtv --help` loads none of them. A flag declared by several subcommands with
the same meaning (`--overwrite`, `-q`, `--expert-layout`) is declared here once;
each caller still words its help for its own positional names.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Run = Callable[[argparse.Namespace], int]

# the sentence `--overwrite` says where the output is a directory sgtv wrote (`convert.atomic.prepare_output`)
REPLACE_OUTPUT = "replace {} if it is a previous sgtv output or an empty directory (nothing else)"


def subcommand(subparsers: Any, name: str, run: Run, help: str, description: str | None = None) -> Any:
    """Register subcommand `name` (its one-line `help`, its `--help` `description`) running `run(args)`; its parser."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.set_defaults(func=run)
    return p


def overwrite_flag(p: argparse.ArgumentParser, help: str) -> None:
    """`--overwrite`: replace an existing output (what it may replace: `help`)."""
    p.add_argument("--overwrite", action="store_true", help=help)


def quiet_flag(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    """`-q` / `--quiet`: no progress bar (and whatever else `help` says)."""
    p.add_argument("-q", "--quiet", action="store_true", help=help)


def expert_layout_flag(p: argparse.ArgumentParser, help: str) -> None:
    """`--expert-layout per-expert|fused` of a MoE output (`convert.expert_layout`)."""
    p.add_argument("--expert-layout", choices=("per-expert", "fused"), default="per-expert", help=help)
