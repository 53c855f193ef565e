"""The `sgtv` command line: one subcommand per job, each defined beside its code.

Every subcommand runs under one error guard (`run_guarded`): an expected
failure (bad config / checkpoint / data: `SgtvError`; the file system:
`OSError`; out of memory) prints one `error: ...` line naming the file, model,
tensor or key and exits with status 2; Ctrl-C exits with 130. Anything else is
a bug and keeps its traceback. `sgtv --debug ...` prints the traceback of
expected failures too.

Quiet by default: a notice the user cannot act on is not printed (transformers'
"PyTorch was not found": sgtv runs without torch by design); `-v` / `--verbose`
lets such notices through. Progress bars stay; `-q` / `--quiet` of the
subcommands that draw them turns them off.

The last line of stderr always starts with `error:`: a message that lists
several problems (a config's) ends with a closing `error:` line counting them,
and a bad flag (argparse) is reported as `error: sgtv merge: argument ...`.
"""

from __future__ import annotations

import sys

from sgtv_jax._version import version
from sgtv_jax.guard import (  # noqa: F401 - the guard's names, also read from here
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    TORCH_NOTICE,
    ArgumentParser,
    add_debug_flag,
    error_lines,
    expected_error,
    quiet_notices,
    run_guarded,
)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="sgtv", description=__doc__.split("\n\n")[0])
    # Just the number on stdout (scripts compare it); argparse exits 0 before the subcommand is required.
    parser.add_argument("--version", action="version", version=version(), help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    # Each job module exposes add_parser(subparsers) that sets `func` on its parser.
    from convert import cli as convert_cli
    from sgtv_jax.merge import cli as merge_cli
    from sgtv_jax.moe import cli as moe_cli
    from sgtv_jax.pipeline import cli as pipeline_cli
    from sgtv_jax.pipeline import report_cli
    from sgtv_jax.pipeline.config import cli as schema_cli

    convert_cli.add_parser(sub)
    pipeline_cli.add_parser(sub)
    merge_cli.add_parser(sub)
    moe_cli.add_parser(sub)
    report_cli.add_parser(sub)
    schema_cli.add_parser(sub)
    add_debug_flag(parser, sub)
    args = parser.parse_args(argv)
    # Streamed merges free and re-allocate chunk-sized temporaries; keep them in the heap instead
    # of a fresh, page-faulting mapping each time (the benchmarks' RSS figures are with this on).
    from sgtv_jax.merge.streaming import reuse_freed_memory
    from sgtv_jax.pipeline import xla_cache

    reuse_freed_memory()
    xla_cache.enable()  # a second merge of the same shapes loads its programs instead of compiling them
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
