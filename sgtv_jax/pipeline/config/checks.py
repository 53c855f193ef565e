"""Checks of single keys (paths, calibration, models, method parameters); each appends its problems."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convert.errors import ConvertError
from convert.lora import read_adapter_config
from sgtv_jax.errors import short_repr
from sgtv_jax.merge.specs import METHOD_SPECS, REFUSED, MethodSpec
from sgtv_jax.merge.specs import PER_MODEL_PARAMS as _PER_MODEL_SPECS
from sgtv_jax.pipeline.config import schema
from sgtv_jax.pipeline.config.model import (
    CALIBRATION_KEYS,
    PER_MODEL_PARAMS,
    TOP_KEYS,
    CalibrationConfig,
    ModelEntry,
)
from sgtv_jax.pipeline.config.values import _suggest, check_param


def method_parameters(method: str) -> tuple[str, ...]:
    """Parameters of merge method `method` a config may set in `parameters` (from the spec table)."""
    return METHOD_SPECS[method].param_names


def _path(value: Any, root: Path, where: str, problems: list[str]) -> str:
    if not isinstance(value, str) or not value:
        problems.append(f"{where} must be a path string, got {short_repr(value)}")
        return ""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (root / p))


def _calibration(raw: Any, root: Path, where: str, problems: list[str]) -> CalibrationConfig | None:
    if raw is None:
        return None
    if isinstance(raw, (str, list)):
        raw = {"data": raw}
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be a mapping with 'data' (file or list of files), got {short_repr(raw)}")
        return None
    data = raw.get("data")
    if data is None:
        problems.append(f"{where}.data is required (a .txt or .jsonl file, or a list of them)")
        data = []
    files = [data] if isinstance(data, str) else list(data) if isinstance(data, (list, tuple)) else [data]
    paths = tuple(_path(f, root, f"{where}.data", problems) for f in files)
    if not paths and raw.get("data") is not None:
        problems.append(f"{where}.data is an empty list")
    settings = schema.settled(schema.CalibrationSettings, raw)  # its keys and values: checked by the schema
    return CalibrationConfig(
        data=paths,
        nsamples=settings.nsamples,
        seqlen=settings.seqlen,
        seed=settings.seed,
        text_field=settings.text_field,
        written=tuple(f if isinstance(f, str) else "" for f in files),
        given=frozenset(k for k in CALIBRATION_KEYS if k in raw),
    )


def _model_entry(i: int, m: Any, base: str, root: Path, problems: list[str]) -> ModelEntry | None:
    where = f"models[{i}]"
    if isinstance(m, str):
        m = {"model": m}
    if not isinstance(m, Mapping):
        problems.append(f"{where} must be a mapping with 'model', got {short_repr(m)}")
        return None
    if "model" not in m:
        problems.append(f"{where}.model is required (path of a fine-tuned model)")
        return None
    p = m.get("parameters") or {}
    if not isinstance(p, Mapping):
        problems.append(f"{where}.parameters must be a mapping, got {short_repr(p)}")
        p = {}
    p = dict(p)  # its keys and values: checked by the schema (PerModelParams)
    path, adapter = _model_and_adapter(m["model"], root, f"{where}.model", problems)
    if base and path == base and not adapter:
        problems.append(f"{where}.model is the base model itself ({short_repr(m['model'])})")
    return ModelEntry(
        model=path,
        parameters=p,
        written=m["model"] if isinstance(m["model"], str) else "",
        adapter=adapter,
        calibration=_calibration(m.get("calibration"), root, f"{where}.calibration", problems),
    )


def _model_and_adapter(value: Any, root: Path, where: str, problems: list[str]) -> tuple[str, str]:
    """(model path, LoRA adapter dir or "") of a `model:` entry, both resolved against `root`.

    mergekit's ``path/to/base+path/to/adapter``: the part after the last ``+``
    is a PEFT adapter directory, checked now (files present, config sane).
    A path that exists as written is a plain model even if it contains ``+``.
    """
    path = _path(value, root, where, problems)
    if not path or "+" not in value or Path(path).exists():
        return path, ""
    model_part, adapter_part = value.rsplit("+", 1)
    model = _path(model_part, root, f"{where} (model before '+')", problems)
    adapter = _path(adapter_part, root, f"{where} (LoRA adapter after '+')", problems)
    if model and adapter:
        try:
            read_adapter_config(adapter)
        except ConvertError as e:
            problems.append(f"{where} LoRA adapter: {e}")
    return model, adapter


def _method(raw: Mapping[str, Any], problems: list[str]) -> MethodSpec | None:
    method = raw.get("merge_method")
    methods = tuple(METHOD_SPECS)
    if method is None:
        problems.append(f"merge_method is required (one of {', '.join(methods)})")
        return None
    if isinstance(method, str) and method in REFUSED:
        problems.append(f"merge_method {method!r} is not supported: {REFUSED[method]}")
        return None
    if not isinstance(method, str) or method not in METHOD_SPECS:
        close = difflib.get_close_matches(method, methods, n=1, cutoff=0.5) if isinstance(method, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"unknown merge_method {short_repr(method)}{hint}; known: {', '.join(methods)}")
        return None
    return METHOD_SPECS[method]


def _method_parameters(gparams: Mapping[str, Any], spec: MethodSpec, problems: list[str]) -> None:
    own = {ps.name: ps for ps in spec.params}
    for k in gparams:
        if k in own or k in PER_MODEL_PARAMS:
            continue
        hint = f" ({short_repr(k)} is a top-level key)" if k in TOP_KEYS else _suggest(k, tuple(own) + PER_MODEL_PARAMS)
        problems.append(f"unknown key {short_repr(k)} in parameters (method {spec.name!r}){hint}")
    for ps in spec.params:
        if ps.name in gparams:
            check_param(gparams[ps.name], ps, "parameters", problems)
        elif ps.required:
            problems.append(f"parameters.{ps.name} is required by merge_method {spec.name!r} ({ps.doc})")
    for ps in _PER_MODEL_SPECS:
        if ps.name in gparams and ps.name not in own:  # ram's top-level epsilon is its own, not DELLA's
            check_param(gparams[ps.name], ps, "parameters", problems)
