"""Subcommand `sgtv methods`: every merge method with its parameters, read from the spec table.

Registered by `add_parser`; errors go through the one guard of `sgtv_jax.cli`.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from sgtv_jax.merge.specs import MERGEKIT_REGISTRY, METHOD_SPECS, PER_MODEL_PARAMS, REFUSED, WITHOUT_EFFECT


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _param_line(ps: Any) -> str:
    if ps.kind == "choice":
        rng = "one of " + " | ".join(map(str, ps.choices))
    elif ps.lo is not None or ps.hi is not None:
        lo = "-inf" if ps.lo is None else _value(float(ps.lo))
        finite_hi = ps.hi is not None and math.isfinite(ps.hi)
        hi = f"{_value(float(ps.hi))}]" if finite_hi else "inf)"
        rng = f"in {'(' if ps.lo_open else '['}{lo}, {hi}"
    else:
        rng = "any"
    default = "required" if ps.required else f"default {_value(ps.default) if ps.default is not None else 'auto'}"
    return f"    {ps.name:<18} {ps.kind:<6} {default:<16} {rng:<22} {ps.doc}"


def _models(spec: Any) -> str:
    if spec.max_models == spec.min_models:
        return f"exactly {spec.min_models}"
    if spec.max_models is None:
        return f"{spec.min_models}+"
    return f"{spec.min_models}-{spec.max_models}"


def describe_methods() -> str:
    """The text `sgtv methods` prints: methods, their parameters, per-model parameters, refused names."""
    lines = ["merge methods (merge_method:) and their parameters (parameters:)", ""]
    for name, spec in METHOD_SPECS.items():
        tags = [f"models: {_models(spec)}"]
        if spec.trims:
            tags.append(f"trim: {spec.default_trim or 'none'} by default, any trim composes")
        else:
            tags.append("trim: refused (no trim step)")
        if spec.needs_base:
            tags.append("uses the base weights")
        if spec.needs_grams:
            tags.append("needs calibration data")
        if spec.learns_weights:
            tags.append("learns the weights from calibration data (Flax families only)")
        lines.append(f"{name}: {spec.doc}")
        lines.append(f"    ({'; '.join(tags)})")
        lines += [_param_line(ps) for ps in spec.params] or ["    (no parameters)"]
        lines.append("")
    lines.append("per-model parameters (models[i].parameters, or top-level parameters as every model's default):")
    lines += [_param_line(ps) for ps in PER_MODEL_PARAMS]
    lines.append("")
    missing = [n for n in MERGEKIT_REGISTRY if n not in METHOD_SPECS]
    lines.append(
        f"mergekit's registry ({len(MERGEKIT_REGISTRY)} methods): "
        + (f"not implemented: {', '.join(missing)}" if missing else "every method implemented")
    )
    if REFUSED:
        lines.append("mergekit methods refused: " + "; ".join(f"{n} ({why})" for n, why in REFUSED.items()))
    else:
        lines.append("mergekit methods refused: none")
    lines.append(
        "accepted in parameters, without effect: " + "; ".join(f"{n} ({why})" for n, why in WITHOUT_EFFECT.items())
    )
    return "\n".join(lines)


def _run_methods(args: argparse.Namespace) -> int:
    print(describe_methods())
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `methods` (sets `func`)."""
    p = subparsers.add_parser(
        "methods",
        help="list the merge methods and their parameters",
        description="Every merge_method with its parameters (type, default, range), "
        "the per-model parameters, and the mergekit methods refused with the reason.",
    )
    p.set_defaults(func=_run_methods)
