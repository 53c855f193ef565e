"""The `sgtv` command line: one subcommand per job, each defined beside its code."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sgtv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Each job module exposes add_parser(subparsers) that sets `func` on its parser.
    from convert import cli as convert_cli
    from sgtv_jax.pipeline import cli as pipeline_cli

    convert_cli.add_parser(sub)
    pipeline_cli.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
