"""`parse_config` / `load_config`: a YAML mapping to a validated `MergeConfig`, every problem listed at once."""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sgtv_jax import numparse
from sgtv_jax.errors import short_repr
from sgtv_jax.merge.paramspec import spec_values
from sgtv_jax.merge.plan import ObsOptions
from sgtv_jax.merge.specs import METHOD_SPECS, WITHOUT_EFFECT
from sgtv_jax.merge.trim import TRIMS
from sgtv_jax.pipeline.config.checks import (
    _calibration,
    _choice,
    _int,
    _memory_budget,
    _method,
    _method_parameters,
    _model_entry,
    _path,
    _rules_shape,
    _suggest,
    _unknown,
)
from sgtv_jax.pipeline.config.cross import _cross_checks
from sgtv_jax.pipeline.config.model import (
    DEFAULT_MEMORY_BUDGET,
    DTYPES,
    HESSIAN_SOURCES,
    TOP_KEYS,
    ConfigError,
    MergeConfig,
    SliceDef,
)
from sgtv_jax.pipeline.config.slices import _slice_checks, _slice_models, _slices
from sgtv_jax.pipeline.config.tokens import _chat_template, _tokenizer
from sgtv_jax.pipeline.config.yamlio import read_yaml


def parse_config(raw: Mapping[str, Any], root: str | Path = ".") -> MergeConfig:
    """Validate a config mapping (as read from YAML) into a `MergeConfig`; raises `ConfigError`."""
    root = Path(root)
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a YAML mapping, got {type(raw).__name__}")
    _unknown(raw, TOP_KEYS, "the config", problems)

    spec = _method(raw, problems)
    base_raw = raw.get("base_model")
    sliced = raw.get("slices") is not None
    if sliced and raw.get("models") is not None:
        problems.append("give either 'models' (whole models) or 'slices' (layer ranges), not both")
    listed = raw.get("models")
    first = listed[0] if isinstance(listed, list) and listed else None
    if base_raw is None and not sliced and spec is not None and spec.base_optional and isinstance(first, Mapping):
        base_raw = first.get("model")  # every model's weight counts whichever is the base: same result
    if base_raw is None and not sliced:
        problems.append("base_model is required (the model the task vectors are taken from)")
    base = _path(base_raw, root, "base_model", problems) if base_raw is not None else ""
    if base and "+" in str(base_raw) and not Path(base).exists():
        problems.append(
            f"base_model {short_repr(base_raw)}: a LoRA adapter ('model+adapter') is supported in "
            "models[].model only (apply the adapter to the base model first)"
        )

    gparams = raw.get("parameters") or {}
    if not isinstance(gparams, Mapping):
        problems.append(f"parameters must be a mapping, got {short_repr(gparams)}")
        gparams = {}
    gparams = dict(gparams)
    for name in sorted(WITHOUT_EFFECT.keys() & gparams.keys()):
        if not isinstance(gparams.pop(name), bool):
            problems.append(f"parameters.{name} must be true or false ({WITHOUT_EFFECT[name]})")
    if spec is not None:
        top: list[str] = []
        _method_parameters(gparams, spec, top)
        # with slices a required parameter may be set per slice: checked there
        problems.extend(p for p in top if not (sliced and "is required by" in p))

    slices: tuple[SliceDef, ...] = ()
    if sliced:
        slices = _slices(raw.get("slices"), root, problems)
        base, entries = _slice_models(slices, base)
    else:
        models_raw = raw.get("models")
        if not isinstance(models_raw, list) or not models_raw:
            problems.append("models must be a non-empty list of {model: path, parameters: {...}}")
            models_raw = []
        # a method that takes the base among its models (linear: its zero task vector still carries its weight)
        not_base = "" if spec is not None and spec.base_optional else base
        entries = [
            e for i, m in enumerate(models_raw) if (e := _model_entry(i, m, not_base, root, problems)) is not None
        ]

    trim = raw.get("trim")
    if trim is not None:
        _rules_shape(trim, "trim", problems)
        for v in spec_values(trim):
            if not isinstance(v, str) or v not in TRIMS:
                problems.append(f"unknown trim {short_repr(v)}{_suggest(v, TRIMS)}; known trims: {', '.join(TRIMS)}")
                break
        if spec is not None and not spec.trims:
            problems.append(
                f"merge_method {spec.name!r} does not trim; remove 'trim' (methods that trim: "
                + ", ".join(n for n, s in METHOD_SPECS.items() if s.trims)
                + ")"
            )

    dtype = raw.get("dtype")
    if dtype is not None and not (isinstance(dtype, str) and dtype in DTYPES):
        problems.append(f"dtype {short_repr(dtype)} is not supported{_suggest(dtype, list(DTYPES))}")
        dtype = None
    out_dtype = raw.get("out_dtype")
    if out_dtype is not None and not (isinstance(out_dtype, str) and out_dtype in DTYPES):
        problems.append(f"out_dtype {short_repr(out_dtype)} is not supported{_suggest(out_dtype, list(DTYPES))}")
        out_dtype = None
    tokenizer = _tokenizer(raw, root, problems)
    chat_template = _chat_template(raw.get("chat_template"), problems)
    hs = _choice(raw, "hessian_source", "merged", HESSIAN_SOURCES, problems)
    percdamp = raw.get("percdamp", 0.01)
    if numparse.problem(percdamp, lo=0) is not None:
        problems.append(f"percdamp must be a finite number >= 0, got {numparse.show(percdamp)}")
        percdamp = 0.01
    blocksize = _int(raw, "blocksize", 128, "", problems)
    prunen = _int(raw, "prunen", 0, "", problems, minimum=0)
    prunem = _int(raw, "prunem", 0, "", problems, minimum=0)
    refit = raw.get("refit", False)
    if not isinstance(refit, bool):
        problems.append(f"refit must be true or false, got {short_repr(refit)}")
        refit = False
    # the N:M rules (each value's type was checked above, bad ones replaced by the defaults)
    problems.extend(ObsOptions(blocksize, float(percdamp), prunen, prunem, refit).problems())
    shard = raw.get("max_shard_size", "5GB")
    if numparse.collect_size(shard, "max_shard_size", None, problems) is None:
        shard = "5GB"
    budget = _memory_budget(raw.get("memory_budget", DEFAULT_MEMORY_BUDGET), problems)
    calib = _calibration(raw.get("calibration"), root, "calibration", problems)
    entries = [
        dataclasses.replace(e, calibration=e.calibration.inherit(calib)) if e.calibration else e for e in entries
    ]
    devices, accumulation = _mesh_keys(raw, problems)

    cfg = MergeConfig(
        base_model=base,
        models=tuple(entries),
        merge_method=spec.name if spec else "",
        parameters=gparams,
        trim=trim,
        dtype=DTYPES[out_dtype] if out_dtype is not None else DTYPES[dtype] if dtype is not None else None,
        compute_dtype=(DTYPES[dtype] if dtype is not None else None) if out_dtype is not None else None,
        tokenizer_source=tokenizer.written if tokenizer is not None else "base",
        tokenizer=tokenizer,
        chat_template=chat_template,
        slices=slices,
        calibration=calib,
        hessian_source=hs,
        blocksize=blocksize,
        percdamp=float(percdamp),
        prunen=prunen,
        prunem=prunem,
        refit=refit,
        seed=_int(raw, "seed", 0, "", problems, minimum=0),
        batch_size=_int(raw, "batch_size", 8, "", problems),
        max_shard_size=str(shard),
        memory_budget=budget,
        moe_min_tokens=(
            _int(raw, "moe_min_tokens", 1, "", problems) if raw.get("moe_min_tokens") is not None else None
        ),
        base_model_written=base_raw if isinstance(base_raw, str) else slices[0].sources[0].label if slices else "",
        devices=devices,
        hessian_accumulation=accumulation,
        written=copy.deepcopy(dict(raw)),
    )
    if spec is not None and slices and not problems:
        for k in range(len(slices)):
            _slice_checks(cfg, k, spec, problems)
    elif spec is not None and entries and not problems:
        _cross_checks(cfg, spec, problems)
    if problems:
        sep = ": " if len(problems) == 1 else ":\n  - "  # one problem: one line
        raise ConfigError("invalid merge config" + sep + "\n  - ".join(problems))
    return cfg


def _mesh_keys(raw: Mapping[str, Any], problems: list[str]) -> tuple[str | int, str]:
    """`devices` ("all" or a positive integer) and `hessian_accumulation` ("float32" or "float64")."""
    devices = raw.get("devices", "all")
    if devices != "all" and (isinstance(devices, bool) or not isinstance(devices, numbers.Integral) or devices < 1):
        problems.append(f"devices must be 'all' or a positive integer, got {short_repr(devices)}")
        devices = "all"
    accumulation = raw.get("hessian_accumulation", "float32")
    if accumulation not in ("float32", "float64"):
        problems.append(f"hessian_accumulation must be float32 or float64, got {short_repr(accumulation)}")
        accumulation = "float32"
    return (devices if devices == "all" else int(devices)), accumulation


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML merge config (relative paths resolved against its directory)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    raw = read_yaml(p)
    if raw is None:
        raise ConfigError(f"{p}: the config is empty")
    try:
        return parse_config(raw, root=p.parent)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
