"""Checks of single keys (paths, calibration, models, method parameters); each appends its problems."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from convert.errors import ConvertError
from convert.lora import read_adapter_config
from sgtv_jax import numparse
from sgtv_jax.errors import short_repr
from sgtv_jax.merge.paramspec import is_gradient, is_rules, spec_values
from sgtv_jax.merge.specs import METHOD_SPECS, REFUSED, MethodSpec, ParamSpec
from sgtv_jax.merge.specs import PER_MODEL_PARAMS as _PER_MODEL_SPECS
from sgtv_jax.pipeline.config.model import (
    CALIBRATION_KEYS,
    DEFAULT_MEMORY_BUDGET,
    MODEL_KEYS,
    PER_MODEL_PARAMS,
    TOP_KEYS,
    CalibrationConfig,
    ModelEntry,
)


def _suggest(key: Any, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5) if isinstance(key, str) else []
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"


def _unknown(d: Mapping[str, Any], known: Sequence[str], where: str, problems: list[str]) -> None:
    for k in d:
        if k not in known:
            problems.append(f"unknown key {short_repr(k)} in {where}{_suggest(k, known)}")


def method_parameters(method: str) -> tuple[str, ...]:
    """Parameters of merge method `method` a config may set in `parameters` (from the spec table)."""
    return METHOD_SPECS[method].param_names


def _path(value: Any, root: Path, where: str, problems: list[str]) -> str:
    if not isinstance(value, str) or not value:
        problems.append(f"{where} must be a path string, got {short_repr(value)}")
        return ""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (root / p))


def _int(d: Mapping[str, Any], key: str, default: int, where: str, problems: list[str], minimum: int = 1) -> int:
    return numparse.collect(d.get(key, default), f"{where}{key}", default, problems, integer=True, lo=minimum)


def _calibration(raw: Any, root: Path, where: str, problems: list[str]) -> CalibrationConfig | None:
    if raw is None:
        return None
    if isinstance(raw, (str, list)):
        raw = {"data": raw}
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be a mapping with 'data' (file or list of files), got {short_repr(raw)}")
        return None
    _unknown(raw, CALIBRATION_KEYS, where, problems)
    data = raw.get("data")
    if data is None:
        problems.append(f"{where}.data is required (a .txt or .jsonl file, or a list of them)")
        data = []
    files = [data] if isinstance(data, str) else list(data) if isinstance(data, (list, tuple)) else [data]
    paths = tuple(_path(f, root, f"{where}.data", problems) for f in files)
    if not paths and raw.get("data") is not None:
        problems.append(f"{where}.data is an empty list")
    tf = raw.get("text_field", "text")
    if not isinstance(tf, str):
        problems.append(f"{where}.text_field must be a string, got {short_repr(tf)}")
        tf = "text"
    return CalibrationConfig(
        data=paths,
        nsamples=_int(raw, "nsamples", 128, f"{where}.", problems),
        seqlen=_int(raw, "seqlen", 512, f"{where}.", problems),
        seed=_int(raw, "seed", 0, f"{where}.", problems, minimum=0),
        text_field=tf,
        written=tuple(f if isinstance(f, str) else "" for f in files),
        given=frozenset(k for k in CALIBRATION_KEYS if k in raw),
    )


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


def _model_entry(i: int, m: Any, base: str, root: Path, problems: list[str]) -> ModelEntry | None:
    where = f"models[{i}]"
    if isinstance(m, str):
        m = {"model": m}
    if not isinstance(m, Mapping):
        problems.append(f"{where} must be a mapping with 'model', got {short_repr(m)}")
        return None
    _unknown(m, MODEL_KEYS, where, problems)
    if "model" not in m:
        problems.append(f"{where}.model is required (path of a fine-tuned model)")
        return None
    p = m.get("parameters") or {}
    if not isinstance(p, Mapping):
        problems.append(f"{where}.parameters must be a mapping, got {short_repr(p)}")
        p = {}
    p = dict(p)
    _unknown(p, PER_MODEL_PARAMS, f"{where}.parameters", problems)
    for ps in _PER_MODEL_SPECS:
        if ps.name in p:
            check_param(p[ps.name], ps, f"{where}.parameters", problems)
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
        if ps.name in gparams:
            check_param(gparams[ps.name], ps, "parameters", problems)


def _choice(raw: Mapping[str, Any], key: str, default: str, known: Sequence[str], problems: list[str]) -> str:
    v = raw.get(key, default)
    if isinstance(v, str) and v in known:
        return v
    problems.append(f"unknown {key} {short_repr(v)}{_suggest(v, known)}; one of {', '.join(known)}")
    return default


def _memory_budget(value: Any, problems: list[str]) -> int:
    """`memory_budget` in bytes (a size such as 256MiB or 1GB, or a positive byte count)."""
    return numparse.collect_size(value, "memory_budget", DEFAULT_MEMORY_BUDGET, problems)
