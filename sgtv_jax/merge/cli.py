"""Subcommand `sgtv methods`: every merge method with its parameters, read from the rows of `specs.METHOD_SPECS`.

Registered by `add_parser`; errors go through the one guard of `sgtv_jax.cli`.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from sgtv_jax.merge.specs import MERGEKIT_REGISTRY, METHOD_SPECS, PER_MODEL_PARAMS, REFUSED, WITHOUT_EFFECT
from sgtv_jax.subcommand import subcommand


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:g}" if isinstance(v, float) else str(v)


def param_range(ps: Any) -> str:
    """A parameter's allowed values in words: `one of a | b`, `in [lo, hi]`, or `any`."""
    if ps.kind == "choice":
        return "one of " + " | ".join(map(str, ps.choices))
    if ps.lo is not None or ps.hi is not None:
        lo = "-inf" if ps.lo is None else _value(float(ps.lo))
        finite_hi = ps.hi is not None and math.isfinite(ps.hi)
        hi = f"{_value(float(ps.hi))}]" if finite_hi else "inf)"
        return f"in {'(' if ps.lo_open else '['}{lo}, {hi}"
    return "any"


def param_default(ps: Any) -> str:
    """`required`, or `default <value>` (`auto`: the method's own rule)."""
    return "required" if ps.required else f"default {_value(ps.default) if ps.default is not None else 'auto'}"


def _param_line(ps: Any) -> str:
    return f"    {ps.name:<18} {ps.kind:<6} {param_default(ps):<16} {param_range(ps):<22} {ps.doc}"


def model_count(spec: Any) -> str:
    """How many fine-tuned models `spec` merges, in words."""
    if spec.max_models == spec.min_models:
        return f"exactly {spec.min_models}"
    if spec.max_models is None:
        return f"{spec.min_models}+"
    return f"{spec.min_models}-{spec.max_models}"


def method_tags(spec: Any) -> list[str]:
    """What `spec` merges, trims and reads, in words (one entry each)."""
    tags = [f"models: {model_count(spec)}"]
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
    return tags


def describe_methods() -> str:
    """The text `sgtv methods` prints: methods, their parameters, per-model parameters, refused names."""
    lines = ["merge methods (merge_method:) and their parameters (parameters:)", ""]
    for name, spec in METHOD_SPECS.items():
        tags = method_tags(spec)
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
    if args.markdown:
        from sgtv_jax.merge.docs import methods_markdown  # noqa: PLC0415 (cycle: docs reads this module's helpers)

        print(methods_markdown(), end="")
    else:
        print(describe_methods())
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `methods` (sets `func`)."""
    p = subcommand(
        subparsers,
        "methods",
        _run_methods,
        help="list the merge methods and their parameters",
        description="Every merge_method with its parameters (type, default, range), "
        "the per-model parameters, and the mergekit methods refused with the reason.",
    )
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the reference as Markdown (what docs/methods-reference.md holds)",
    )
