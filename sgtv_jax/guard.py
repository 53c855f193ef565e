"""The one error guard of every command line (`sgtv`, `python -m convert`): a leaf module.

`run_guarded(func, args)` runs a subcommand: an expected failure (bad config /
checkpoint / data: `SgtvError`; the file system: `OSError`; out of memory)
prints one `error: ...` line naming the file, model, tensor or key and exits
with status 2; Ctrl-C exits with 130. Anything else is a bug and keeps its
traceback (`--debug` shows expected failures' too). `ArgumentParser` reports
bad flags in the same shape. It imports no command module, so `sgtv_jax.cli`
and `convert.cli` both import it without importing each other.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from sgtv_jax.errors import SgtvError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
_OOM_HINT = "lower batch_size / seqlen / nsamples in the config (or merge fewer models at once)"


def _is_xla_oom(e: BaseException) -> bool:
    # jaxlib's XlaRuntimeError / JaxRuntimeError, matched by name: the CLI does not import jax to check.
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"XlaRuntimeError", "JaxRuntimeError"}) and "RESOURCE_EXHAUSTED" in str(e)


def _os_message(e: OSError) -> str:
    where = f"{e.filename}" if e.filename is not None else ""
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        what = "no space left on device (free some space or write OUT elsewhere)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"{what} (check the permissions of this path and its folder)"
    return f"{where}: {what}" if where else what


def expected_error(e: BaseException, command: str = "") -> str | None:
    """The one-line message for an expected failure, or None for a bug (keeps its traceback)."""
    doing = f" while running `sgtv {command}`" if command else ""
    if isinstance(e, SgtvError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):  # a reader that did not name its file
        return f"not UTF-8 text ({e.reason} at byte {e.start}){doing}"
    if isinstance(e, OSError):
        return _os_message(e)
    if isinstance(e, MemoryError):
        return f"out of memory{doing}; {_OOM_HINT}"
    if _is_xla_oom(e):
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"out of memory{doing} ({first}); {_OOM_HINT}"
    return None


def error_lines(msg: str) -> str:
    """`error: msg`, plus a closing `error:` line when `msg` spans lines (its last line then starts with `error:`)."""
    lines = msg.splitlines()
    if len(lines) < 2:
        return f"error: {msg}"
    items = sum(1 for ln in lines[1:] if ln.lstrip().startswith("- "))
    head = lines[0].rstrip().rstrip(":")
    what = f"{items} problem{'s' if items != 1 else ''} listed above" if items else "details above"
    return f"error: {msg}\nerror: {head} ({what})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors in the guard's shape: usage, then `error: PROG: ...`, status 2."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"error: {self.prog}: {message}\n")


# transformers logs this (on its package logger) when imported without torch; the user env has no
# torch on purpose and only tokenizers / configs are read through transformers, so it is noise.
TORCH_NOTICE = "PyTorch was not found. Models won't be available"


class _DropTorchNotice(logging.Filter):
    """Drops transformers' torch-absent notice, and only it (real warnings and errors still print)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TORCH_NOTICE)


@contextlib.contextmanager
def quiet_notices(verbose: bool = False) -> Iterator[None]:
    """While the block runs: transformers' torch notice is dropped (unless `verbose`)."""
    if verbose:
        yield
        return
    logger, drop = logging.getLogger("transformers"), _DropTorchNotice()
    logger.addFilter(drop)  # the logger transformers' __init__ logs on; it keeps filters added before its import
    try:
        yield
    finally:
        logger.removeFilter(drop)


def run_guarded(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run a subcommand's `func(args)` under the CLI's error policy (module doc); the exit status."""
    debug = bool(getattr(args, "debug", False))
    command = str(getattr(args, "command", "") or "")
    try:
        with quiet_notices(bool(getattr(args, "verbose", False))):
            return int(func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - classified below; bugs are re-raised
        msg = expected_error(e, command)
        if msg is None:
            raise
        if debug:
            traceback.print_exc()
        print(error_lines(msg), file=sys.stderr)
        return EXIT_ERROR


GLOBAL_FLAGS = (
    (("--debug",), "show tracebacks of expected errors too"),
    (("-v", "--verbose"), "also print third-party notices that sgtv hides (e.g. transformers' torch notice)"),
)


def add_debug_flag(parser: argparse.ArgumentParser, subparsers: Any) -> None:
    """`--debug` and `-v/--verbose` before the subcommand (`sgtv --debug merge ...`) or after it."""
    for flags, help_ in GLOBAL_FLAGS:
        parser.add_argument(*flags, action="store_true", help=help_)
        for p in subparsers.choices.values():
            p.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=help_)
