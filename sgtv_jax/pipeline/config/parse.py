"""`parse_config` / `load_config`: a YAML mapping to a validated `MergeConfig`, every problem listed at once."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sgtv_jax.errors import short_repr
from sgtv_jax.merge.paramspec import spec_values
from sgtv_jax.merge.plan import ObsOptions
from sgtv_jax.merge.specs import METHOD_SPECS, WITHOUT_EFFECT, MethodSpec
from sgtv_jax.merge.trim import TRIMS
from sgtv_jax.pipeline import base_rules
from sgtv_jax.pipeline.config import schema
from sgtv_jax.pipeline.config.checks import _calibration, _method, _method_parameters, _model_entry, _path
from sgtv_jax.pipeline.config.cross import _cross_checks
from sgtv_jax.pipeline.config.model import ConfigError, MergeConfig, ModelEntry, SliceDef
from sgtv_jax.pipeline.config.schema import DTYPES
from sgtv_jax.pipeline.config.slices import _slice_checks, _slice_models, _slices
from sgtv_jax.pipeline.config.tokens import _chat_template, _tokenizer
from sgtv_jax.pipeline.config.values import _rules_shape, _suggest
from sgtv_jax.pipeline.config.yamlio import read_yaml


def parse_config(raw: Mapping[str, Any], root: str | Path = ".") -> MergeConfig:
    """Validate a config mapping (as read from YAML) into a `MergeConfig`; raises `ConfigError`.

    The declared schema checks every key and leaf value (`schema.problems`);
    the builders here resolve paths and check what combines keys. Every
    problem is listed at once.
    """
    root = Path(root)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a YAML mapping, got {type(raw).__name__}")
    problems = schema.problems(raw)
    st = schema.settled(schema.Settings, raw)  # each bad value (reported above) at its default
    spec = _method(raw, problems)
    sliced = raw.get("slices") is not None
    base_raw, base = _base(raw, spec, sliced, root, problems)
    gparams = _global_parameters(raw, spec, sliced, problems)
    slices: tuple[SliceDef, ...] = ()
    if sliced:
        slices = _slices(raw.get("slices"), root, problems)
        base, entries = _slice_models(slices, base)
    else:
        entries = _models(raw.get("models"), spec, raw.get("base_model"), base, root, problems)
    trim = _trim(raw.get("trim"), spec, problems)
    tokenizer = _tokenizer(raw, root, problems)
    chat_template = _chat_template(raw.get("chat_template"), problems)
    # the N:M rules (each value's type was checked by the schema, bad ones replaced by the defaults)
    problems.extend(ObsOptions(st.blocksize, st.percdamp, st.prunen, st.prunem, st.refit).problems())
    calib = _calibration(raw.get("calibration"), root, "calibration", problems)
    entries = [
        dataclasses.replace(e, calibration=e.calibration.inherit(calib)) if e.calibration else e for e in entries
    ]
    dtype, out_dtype = DTYPES.get(st.dtype or ""), DTYPES.get(st.out_dtype or "")
    cfg = MergeConfig(
        base_model=base,
        models=tuple(entries),
        merge_method=spec.name if spec else "",
        parameters=gparams,
        trim=trim,
        dtype=out_dtype or dtype,
        compute_dtype=dtype if out_dtype is not None else None,
        tokenizer_source=tokenizer.written if tokenizer is not None else "base",
        tokenizer=tokenizer,
        chat_template=chat_template,
        slices=slices,
        calibration=calib,
        base_model_written=base_raw if isinstance(base_raw, str) else slices[0].sources[0].label if slices else "",
        written=copy.deepcopy(dict(raw)),
        **{k: getattr(st, k) for k in _SETTINGS},
    )
    if spec is not None and not problems:
        if slices:
            for k in range(len(slices)):
                _slice_checks(cfg, k, spec, problems)
        elif entries:
            _cross_checks(cfg, spec, problems)
    if problems:
        sep = ": " if len(problems) == 1 else ":\n  - "  # one problem: one line
        raise ConfigError("invalid merge config" + sep + "\n  - ".join(problems))
    return cfg


# The settings a MergeConfig takes as the schema validated them (dtype / out_dtype are mapped above).
_SETTINGS = tuple(k for k in schema.keys(schema.Settings) if k not in ("dtype", "out_dtype"))


def _base(
    raw: Mapping[str, Any], spec: MethodSpec | None, sliced: bool, root: Path, problems: list[str]
) -> tuple[Any, str]:
    """(`base_model` as written, resolved; "" when none): a base-optional method's first model stands in."""
    base_raw = raw.get("base_model")
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
    return base_raw, base


def _global_parameters(
    raw: Mapping[str, Any], spec: MethodSpec | None, sliced: bool, problems: list[str]
) -> dict[str, Any]:
    """The top-level `parameters`, checked against the method's row of the table (no-op keys dropped)."""
    gparams = raw.get("parameters") or {}
    if not isinstance(gparams, Mapping):
        problems.append(f"parameters must be a mapping, got {short_repr(gparams)}")
        gparams = {}
    gparams = dict(gparams)
    for name in sorted(WITHOUT_EFFECT.keys() & gparams.keys()):
        if not isinstance(gparams.pop(name), bool):
            problems.append(f"parameters.{name} must be true or false ({WITHOUT_EFFECT[name]})")
    base_rules.whole_weights(spec, sliced or raw.get("base_model") is not None, gparams, problems)
    if spec is not None:
        top: list[str] = []
        _method_parameters(gparams, spec, top)
        # with slices a required parameter may be set per slice: checked there
        problems.extend(p for p in top if not (sliced and "is required by" in p))
    return gparams


def _models(
    models_raw: Any, spec: MethodSpec | None, base_written: Any, base: str, root: Path, problems: list[str]
) -> list[ModelEntry]:
    """`models:`, each entry built (paths resolved, adapters read); the base's place by `base_rules`."""
    if not isinstance(models_raw, list) or not models_raw:
        problems.append("models must be a non-empty list of {model: path, parameters: {...}}")
        models_raw = []
    return base_rules.model_entries(
        spec, base_written, base, models_raw, lambda i, m, not_base: _model_entry(i, m, not_base, root, problems)
    )


def _trim(trim: Any, spec: MethodSpec | None, problems: list[str]) -> Any:
    """`trim`: a trim name or filter rules of them, for a method that trims."""
    if trim is None:
        return None
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
    return trim


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
