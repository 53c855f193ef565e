"""One value against its declaration: parameter specs (`check_param`), unknown keys with a "did you mean".

Imports nothing of the config package, so the declared schema (`schema`) and the
builders (`checks`, `slices`, `tokens`) share these rules.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from sgtv_jax import numparse
from sgtv_jax.errors import short_repr
from sgtv_jax.merge.paramspec import is_gradient, is_rules, spec_values
from sgtv_jax.merge.specs import ParamSpec


def _suggest(key: Any, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5) if isinstance(key, str) else []
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"


def _unknown(d: Mapping[str, Any], known: Sequence[str], where: str, problems: list[str]) -> None:
    for k in d:
        if k not in known:
            problems.append(f"unknown key {short_repr(k)} in {where}{_suggest(k, known)}")


def _rules_shape(spec: Any, key: str, problems: list[str]) -> None:
    """Filter rules: only `filter` (a string) and `value` (required), recursively."""
    if not is_rules(spec):
        return
    for r in spec:
        _unknown(r, ("filter", "value"), f"{key} rule", problems)
        if "value" not in r:
            problems.append(f"{key}: filter rule {short_repr(r)} has no 'value'")
        if r.get("filter") is not None and not isinstance(r.get("filter"), str):
            problems.append(
                f"{key}: filter must be a string (a substring of tensor names), got {short_repr(r.get('filter'))}"
            )
        _rules_shape(r.get("value"), key, problems)


def _leaf_problem(v: Any, ps: ParamSpec) -> str | None:
    """Why the plain value `v` is not a valid `ps` (None: it is)."""
    if v is None and ps.default is None:
        return None  # "the method's own rule"
    if ps.kind == "bool":
        return None if isinstance(v, bool) else f"must be true or false, got {short_repr(v)}"
    if ps.kind == "choice":
        return (
            None
            if isinstance(v, str) and v in ps.choices
            else f"must be one of {', '.join(map(str, ps.choices))}, got {short_repr(v)}"
        )
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return f"must be a number (or a gradient / filter rules), got {short_repr(v)}"
    why = numparse.problem(v, integer=ps.kind == "int", lo=ps.lo, hi=ps.hi, lo_open=ps.lo_open)
    return None if why is None else f"{why}, got {numparse.show(v)}"


def check_param(spec: Any, ps: ParamSpec, where: str, problems: list[str]) -> None:
    """Check a parameter spec (plain value, gradient, filter rules) against its declaration `ps`.

    Problems are appended as `"{where}.{name} must ..., got ..."` (values shown truncated).
    """
    key = f"{where}.{ps.name}" if where else ps.name
    _rules_shape(spec, key, problems)
    if ps.kind != "float" and is_gradient(spec) and len(spec) > 1:
        problems.append(f"{key} cannot be a gradient (a {ps.kind} parameter), got {short_repr(spec)}")
        return
    for v in spec_values(spec):
        why = _leaf_problem(v, ps)
        if why is not None:
            problems.append(f"{key} {why}")
            return  # one message per key is enough
