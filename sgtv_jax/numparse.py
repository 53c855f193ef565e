"""The one guard for numbers read from outside: YAML configs, JSON sidecars, GGUF metadata, CLI flags.

Every number a user (or a file) supplies goes through `problem` (why it is not
acceptable, or None) or `number` (the value, or `NumberError` naming where it
came from). The rules, declared once:

* booleans are not numbers (YAML `true` is not 1);
* integers stay Python ints (never through float, so a 401-digit integer is
  compared exactly) and must fit int64, the widest integer NumPy / JAX hold;
* reals must be finite as a float64: NaN, +-Inf (YAML `.inf`, JSON `1e400`)
  and integers beyond float range (`float(10**400)` raises OverflowError) are
  refused with a message, never a traceback;
* bounds are inclusive unless `lo_open` / `hi_open`.

Sizes (`256MiB`, `5GB`, a byte count) go through `size` with the same rules:
`infGB`, `1e400MB` and anything above `MAX_BYTES` are refused as such.
Echoed values are truncated (`sgtv_jax.errors.short_repr`), so a 9 kB value
never becomes a 9 kB message.
"""

from __future__ import annotations

import math
import numbers
import re
import sys
from typing import Any

from sgtv_jax.errors import SgtvError, short_repr

INT_MAX = 2**63 - 1
"""Largest integer accepted anywhere (int64: what NumPy / JAX / safetensors hold)."""

MAX_BYTES = 2**63 - 1
"""Largest size in bytes (int64)."""

SIZE_UNITS = {
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
"""Size suffixes (upper-cased), transformers' convention: KB = 1000, KiB = 1024; a bare number is bytes."""


class NumberError(SgtvError):
    """A number from a config, sidecar, header or flag that is not acceptable; the message names it."""


def show(value: Any) -> str:
    """`value` for a message, truncated (a huge int is elided, not printed in full)."""
    try:
        return short_repr(value)
    except ValueError:  # int above sys.int_info.str_digits_check_threshold: repr itself refuses
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"


def _bound(x: float | int, integer: bool) -> str:
    return str(int(x)) if integer else repr(float(x))


def problem(
    value: Any,
    *,
    integer: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> str | None:
    """Why `value` is not an acceptable number (e.g. ``"must be in [0.0, 1.0]"``), or None.

    `lo` / `hi` of None or +-inf mean unbounded (integers are still bounded by `INT_MAX`).
    """
    need = requirement(integer=integer, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return need if integer or need == "must be a number" else need.replace("must be", "must be a number", 1)
    if integer and not isinstance(value, numbers.Integral):
        return need
    if integer:
        v: float | int = int(value)  # type: ignore[call-overload]  # numbers.Integral has __int__
        if abs(v) > INT_MAX:
            return f"is too large (an integer must be within +-{INT_MAX})"
    else:
        try:
            v = float(value)
        except OverflowError:  # an int beyond float range
            return f"is too large (beyond the float range, about {sys.float_info.max:.3g})"
        if not math.isfinite(v):
            return "must be finite"
    lo, hi = _finite(lo), _finite(hi)
    below = lo is not None and (v <= lo if lo_open else v < lo)
    above = hi is not None and (v >= hi if hi_open else v > hi)
    return need if below or above else None


def _finite(bound: float | None) -> float | None:
    return None if bound is None or math.isinf(bound) else bound


def requirement(
    *,
    integer: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> str:
    """What `problem` asks for, e.g. ``"must be an integer >= 1"``, ``"must be in [0.0, 1.0]"``."""
    lo, hi = _finite(lo), _finite(hi)
    prefix = "must be an integer" if integer else "must be" if lo is not None or hi is not None else "must be a number"
    if lo is not None and hi is not None:
        return f"{prefix} in {'(' if lo_open else '['}{_bound(lo, integer)}, {_bound(hi, integer)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{prefix} {'>' if lo_open else '>='} {_bound(lo, integer)}"
    if hi is not None:
        return f"{prefix} {'<' if hi_open else '<='} {_bound(hi, integer)}"
    return prefix


def number(value: Any, what: str, **bounds: Any) -> int | float:
    """`value` checked by `problem(value, **bounds)`: an int when `integer`, else a float.

    Raises `NumberError("{what} {why}, got {value}")`.
    """
    why = problem(value, **bounds)
    if why is not None:
        raise NumberError(f"{what} {why}, got {show(value)}")
    return int(value) if bounds.get("integer") else float(value)


def collect(value: Any, what: str, default: Any, problems: list[str], **bounds: Any) -> Any:
    """`number` for a validator that lists every problem: appends the message and returns `default`."""
    try:
        return number(value, what, **bounds)
    except NumberError as e:
        problems.append(str(e))
        return default


def size_problem(value: Any) -> tuple[int, str | None]:
    """(bytes, None) for a size such as ``256MiB``, ``1.5GB`` or a positive byte count; (0, why) otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        return 0, "must be a size such as 500MB, 2GB or 1GiB"
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.eE+-]+|inf|infinity|nan)\s*([A-Za-z]*)\s*", value, re.IGNORECASE)
        unit = m.group(2).upper() if m else ""
        if m is None or (unit and unit != "B" and unit not in SIZE_UNITS):
            return 0, "must be a size such as 500MB, 2GB or 1GiB"
        try:
            amount: float | int = int(m.group(1)) if re.fullmatch(r"[0-9]+", m.group(1)) else float(m.group(1))
        except ValueError:
            return 0, "must be a size such as 500MB, 2GB or 1GiB"
        mult = SIZE_UNITS.get(unit, 1)
    else:
        amount, mult = value, 1  # type: ignore[assignment]  # a numbers.Real
    why = problem(amount, integer=isinstance(amount, numbers.Integral), lo=0, lo_open=True)
    if why is not None and why.startswith("is too large"):
        return 0, f"is too large (at most {MAX_BYTES} bytes)"
    if why is not None:
        return 0, "must be finite" if why == "must be finite" else "must be a positive size"
    total = amount * mult
    if total > MAX_BYTES:
        return 0, f"is too large (at most {MAX_BYTES} bytes)"
    total = int(total)
    if total < 1:
        return 0, "must be a positive size (at least 1 byte)"
    return total, None


def size(value: Any, what: str) -> int:
    """`value` as bytes (see `size_problem`); `NumberError("{what} {why}, got {value}")` otherwise."""
    total, why = size_problem(value)
    if why is not None:
        raise NumberError(f"{what} {why}, got {show(value)}")
    return total


def collect_size(value: Any, what: str, default: Any, problems: list[str]) -> Any:
    """`size` for a validator that lists every problem: appends the message and returns `default`."""
    total, why = size_problem(value)
    if why is not None:
        problems.append(f"{what} {why}, got {show(value)}")
        return default
    return total


def flag(value: Any, name: str, **bounds: Any) -> Any:
    """A command-line flag's value checked like any number; the message names the flag and the value.

    None (flag not given) passes through.
    """
    if value is None:
        return None
    why = problem(value, **bounds)
    if why is not None:
        raise NumberError(f"{name} {show(value)}: {why}")
    return int(value) if bounds.get("integer") else float(value)


def size_flag(value: Any, name: str) -> int:
    """A size flag (`--max-shard-size`) in bytes; the message names the flag and the value."""
    total, why = size_problem(value)
    if why is not None:
        raise NumberError(f"{name} {show(value)}: {why}")
    return total
