"""`slices:` (mergekit's output slices): parsing, the models they read, each slice as its own config."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sgtv_jax.errors import short_repr
from sgtv_jax.merge.paramspec import spec_values
from sgtv_jax.merge.specs import MethodSpec
from sgtv_jax.pipeline.config.checks import _method_parameters, _model_and_adapter, _path
from sgtv_jax.pipeline.config.cross import _cross_checks
from sgtv_jax.pipeline.config.model import (
    ConfigError,
    MergeConfig,
    ModelEntry,
    SliceDef,
    SliceSource,
)


def _layer_range(v: Any, where: str, problems: list[str]) -> tuple[int, int]:
    ok = (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v)
        and 0 <= int(v[0]) < int(v[1])
    )
    if not ok:
        problems.append(f"{where} must be [start, stop] with 0 <= start < stop (decoder layers), got {short_repr(v)}")
        return (0, 1)
    return (int(v[0]), int(v[1]))


def _per_model_params(p: Any, where: str, problems: list[str]) -> dict:
    """A source's own per-model parameters (keys and values: checked by the schema, PerModelParams)."""
    if p is None:
        return {}
    if not isinstance(p, Mapping):
        problems.append(f"{where} must be a mapping, got {short_repr(p)}")
        return {}
    return dict(p)


def _slices(raw: Any, root: Path, problems: list[str]) -> tuple[SliceDef, ...]:
    """`slices:` (mergekit's output slices), checked key by key; layer counts against the models come later.

    Unknown keys and per-model parameter values are the schema's (`schema.SliceYaml`).
    """
    if not isinstance(raw, list) or not raw:
        problems.append("slices must be a non-empty list of {sources: [{model: path, layer_range: [start, stop]}]}")
        return ()
    out = []
    for k, sl in enumerate(raw):
        where = f"slices[{k}]"
        if not isinstance(sl, Mapping):
            problems.append(f"{where} must be a mapping with 'sources', got {short_repr(sl)}")
            continue
        srcs_raw = sl.get("sources")
        if not isinstance(srcs_raw, list) or not srcs_raw:
            problems.append(f"{where}.sources must be a non-empty list of {{model: path, layer_range: [start, stop]}}")
            continue
        sources = []
        for j, src in enumerate(srcs_raw):
            w = f"{where}.sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                problems.append(f"{w} must be a mapping with 'model' and 'layer_range', got {short_repr(src)}")
                continue
            path, adapter = _model_and_adapter(src["model"], root, f"{w}.model", problems)
            sources.append(
                SliceSource(
                    model=path,
                    layer_range=_layer_range(src["layer_range"], f"{w}.layer_range", problems),
                    parameters=_per_model_params(src.get("parameters"), f"{w}.parameters", problems),
                    written=src["model"] if isinstance(src["model"], str) else "",
                    adapter=adapter,
                )
            )
        if len({s.num_layers for s in sources}) > 1:
            problems.append(
                f"{where}: every source of a slice must span the same number of layers, got "
                + ", ".join(f"{s.label} {list(s.layer_range)}" for s in sources)
            )
        sbase = sl.get("base_model")
        base = _path(sbase, root, f"{where}.base_model", problems) if sbase is not None else ""
        params = sl.get("parameters") or {}
        if not isinstance(params, Mapping):
            problems.append(f"{where}.parameters must be a mapping, got {short_repr(params)}")
            params = {}
        if sources:
            out.append(SliceDef(tuple(sources), dict(params), base, sbase if isinstance(sbase, str) else ""))
    return tuple(out)


def _slice_models(slices: tuple[SliceDef, ...], base: str) -> tuple[str, list[ModelEntry]]:
    """(the base: `base` or the first slice's first model; every other model the slices read, once)."""
    if not slices:
        return base, []
    if not base:
        base = slices[0].sources[0].model
    seen: dict[tuple[str, str], ModelEntry] = {}
    for sl in slices:
        for s in sl.sources:
            key = (s.model, s.adapter)
            if key != (base, "") and key not in seen:
                seen[key] = ModelEntry(model=s.model, parameters={}, written=s.written, adapter=s.adapter)
        if sl.base_model and (sl.base_model, "") not in seen and sl.base_model != base:
            seen[(sl.base_model, "")] = ModelEntry(model=sl.base_model, parameters={}, written=sl.base_written)
    return base, list(seen.values())


def slice_roles(cfg: MergeConfig, k: int) -> tuple[int, tuple[int, ...]]:
    """(the source of slice `k` that is its base, the sources merged onto it) as indices into its sources.

    A linear merge (normalized) weighs every source, as mergekit's does: its
    first source is only the reference the task vectors are taken against
    (the weighted mean does not depend on it). Otherwise the base is the
    slice's `base_model` (else the top-level one), which must be one of the
    sources; passthrough merges none (its one source is copied). ConfigError
    when the slice's method needs a base its sources lack.
    """
    sl = cfg.slices[k]
    n = len(sl.sources)
    if cfg.merge_method == "passthrough":
        if n != 1:
            raise ConfigError(
                f"slices[{k}]: merge_method 'passthrough' copies one source per slice, got {n} "
                "(stack them as separate slices, or merge them with another method)"
            )
        return 0, ()
    if cfg.merge_method == "linear" and {**cfg.parameters, **sl.parameters}.get("normalize", True) is not False:
        return 0, tuple(range(n))  # mergekit's linear weighs every source, the base included
    base = sl.base_model or cfg.base_model
    at = next((j for j, s in enumerate(sl.sources) if s.model == base and not s.adapter), None)
    if at is not None:
        return at, tuple(j for j in range(n) if j != at)
    raise ConfigError(
        f"slices[{k}]: merge_method {cfg.merge_method!r} merges task vectors against a base model, and "
        f"the slice's base ({sl.base_written or cfg.base_model_written or base}) is none of its sources: "
        "list the base model with its layer_range among the slice's sources"
    )


def slice_config(cfg: MergeConfig, k: int) -> MergeConfig:
    """The `MergeConfig` of slice `k` alone: its base, its merged sources as models, its parameters.

    Precedence as mergekit: a source's own `parameters`, then the slice's,
    then the top-level ones.
    """
    sl = cfg.slices[k]
    b, merged = slice_roles(cfg, k)
    src = sl.sources[b]
    return dataclasses.replace(
        cfg,
        base_model=src.model,
        base_model_written=src.label,
        models=tuple(
            ModelEntry(sl.sources[j].model, sl.sources[j].parameters, None, sl.sources[j].label, sl.sources[j].adapter)
            for j in merged
        ),
        parameters={**cfg.parameters, **sl.parameters},
        slices=(),
    )


def _slice_checks(cfg: MergeConfig, k: int, spec: MethodSpec, problems: list[str]) -> None:
    """Slice `k`'s own checks: its roles, parameters, model count, and no calibrated trim."""
    sl = cfg.slices[k]
    own: list[str] = []
    _method_parameters(dict(sl.parameters), spec, own)
    problems.extend(f"slices[{k}].{p}" for p in own if "is required by" not in p)
    if cfg.needs_calibration() or cfg.calibration is not None:
        if k == 0:
            problems.append(
                "slices with calibration data (trim sparsegpt / wanda, regmean, or 'calibration') are refused: "
                "calibrated trims run whole models block by block through a Flax model of the architecture, "
                "and slices build a new stack of layers from several models; use a data-free trim "
                "(magnitude, random, magprune, breadcrumbs)"
            )
        return
    try:
        b, merged = slice_roles(cfg, k)
    except ConfigError as e:
        problems.append(str(e))
        return
    if not merged:
        scale = spec_values(cfg.parameters.get("scale", 1.0)) + spec_values(sl.parameters.get("scale", 1.0))
        if any(v != 1 for v in scale):
            problems.append(f"slices[{k}]: passthrough 'scale' other than 1 is not supported with slices")
        return
    sub = []
    scfg = slice_config(cfg, k)
    for ps in spec.params:
        if ps.required and ps.name not in scfg.parameters:
            sub.append(f"parameters.{ps.name} is required by merge_method {spec.name!r} ({ps.doc})")
    _cross_checks(scfg, spec, sub)
    problems.extend(f"slices[{k}]: {p}" for p in sub)
