"""Merge configuration: mergekit's YAML plus our calibration / OBS keys, validated up front.

The format users already write (mergekit)::

    models:
      - model: path/to/ft_a
        parameters: {density: 0.5, weight: 1.0}
      - model: path/to/ft_b
        parameters: {density: [1, 0.7, 0.1], weight: [{filter: mlp, value: 0.5}, {value: 0}]}
    merge_method: ties
    base_model: path/to/base
    parameters: {normalize: true}
    dtype: bfloat16
    tokenizer_source: base

Our keys (top level): ``trim`` (a trim name or filter rules, e.g. ``sparsegpt``),
``calibration`` (``data``: text / JSONL file(s), ``nsamples``, ``seqlen``,
``seed``, ``text_field``; also allowed per model, used by ``per_task``),
``hessian_source`` (``base`` | ``per_task`` | ``merged``), ``blocksize``,
``percdamp``, ``prunen`` / ``prunem``, ``refit`` (least-squares refit of the
entries OBS kept, see ``sgtv_jax.refit``), ``seed``, ``batch_size``,
``max_shard_size``, ``memory_budget`` (data-free merges: a tensor whose merge
needs more working memory than this, e.g. ``256MiB`` (the default), is merged
in row chunks that fit it, with the same bits), ``moe_min_tokens`` (MoE: the fewest routed calibration
tokens an expert needs for its own routing-weighted Hessian, default the
hidden size; see ``sgtv_jax.pipeline.streams``).

Parameter values (per model ``density`` / ``weight`` / ``gamma`` / ``epsilon``,
and method parameters) are *specs*:

* a plain value;
* a list of numbers: a gradient over the decoder blocks, interpolated linearly
  (``np.interp`` of ``linspace(0, 1, len)`` at ``layer / (num_layers - 1)``);
  tensors outside the blocks use position 0 (embeddings) or 1 (final norm, head);
* a list of rules ``{filter: substring, value: spec}``; the first rule whose
  filter is a substring of the HF tensor name wins, a rule without filter
  matches everything; the value may itself be a gradient.

(`sgtv_jax.merge.paramspec` resolves them, for the Python API too.) A model
without a per-model value takes the top-level one, else the method's default.

Relative paths are relative to the YAML file's directory; the strings as
written are kept for reports and model cards (`MergeConfig.to_dict`), so no
local absolute path ends up in a published model. Every problem found is
reported at once (``ConfigError``), each naming its key and suggesting the
likely key for a typo (difflib). Method parameters are checked against the
declared table `sgtv_jax.merge.specs` (type, range, finiteness): a quoted
``"false"`` is not a boolean and ``.nan`` is not a density. YAML aliases
(``*name``) are refused, so an alias bomb cannot expand.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from convert.errors import ConvertError
from convert.export import parse_size
from convert.lora import read_adapter_config
from sgtv_jax.errors import SgtvError, short_repr
from sgtv_jax.merge import paramspec
from sgtv_jax.merge.paramspec import is_gradient, is_rules, layer_position, spec_values
from sgtv_jax.merge.plan import ObsOptions
from sgtv_jax.merge.specs import METHOD_SPECS, REFUSED, MethodSpec, ParamSpec
from sgtv_jax.merge.specs import PER_MODEL_PARAMS as _PER_MODEL_SPECS
from sgtv_jax.merge.trim import DATA_TRIMS, TRIMS

__all__ = [
    "CALIBRATION_KEYS",
    "CalibrationConfig",
    "ConfigError",
    "DTYPES",
    "HESSIAN_SOURCES",
    "MODEL_KEYS",
    "MergeConfig",
    "ModelEntry",
    "PER_MODEL_PARAMS",
    "TOP_KEYS",
    "check_param",
    "layer_position",
    "load_config",
    "method_kwargs",
    "method_parameters",
    "model_parameters",
    "parse_config",
    "read_yaml",
    "resolve_spec",
    "spec_values",
]

HESSIAN_SOURCES = ("base", "per_task", "merged")
TOP_KEYS = (
    "models",
    "merge_method",
    "base_model",
    "parameters",
    "dtype",
    "tokenizer_source",
    "trim",
    "calibration",
    "hessian_source",
    "blocksize",
    "percdamp",
    "prunen",
    "prunem",
    "refit",
    "seed",
    "batch_size",
    "max_shard_size",
    "memory_budget",
    "moe_min_tokens",
)
MODEL_KEYS = ("model", "parameters", "calibration")
PER_MODEL_PARAMS = tuple(p.name for p in _PER_MODEL_SPECS)
CALIBRATION_KEYS = ("data", "nsamples", "seqlen", "seed", "text_field")
DEFAULT_MEMORY_BUDGET = 256 << 20
DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "fp32", "fp32": "fp32"}


class ConfigError(SgtvError):
    """An invalid merge configuration; the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data: `data` files (.txt / .jsonl), `nsamples` windows of `seqlen` tokens.

    `data` holds resolved paths; `written` the same files as the YAML wrote them.
    """

    data: tuple[str, ...]
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    text_field: str = "text"
    written: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data with the paths as written."""
        return {
            "data": list(self.written or self.data),
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "text_field": self.text_field,
        }


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One fine-tuned model: its path, parameter specs, optional own calibration (per_task).

    `model` is the resolved path; `written` the path as the YAML wrote it.
    `adapter`: a PEFT LoRA adapter directory applied to `model`
    (``model: base+adapter``, see `convert.lora`), else "".
    """

    model: str
    parameters: Mapping[str, Any]
    calibration: CalibrationConfig | None = None
    written: str = ""
    adapter: str = ""

    @property
    def label(self) -> str:
        """The model as the user wrote it (for messages and reports)."""
        return self.written or self.model


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration (paths resolved to absolute strings, as-written kept)."""

    base_model: str
    models: tuple[ModelEntry, ...]
    merge_method: str
    parameters: Mapping[str, Any]
    trim: Any = None
    dtype: str | None = None
    tokenizer_source: str = "base"
    calibration: CalibrationConfig | None = None
    hessian_source: str = "merged"
    blocksize: int = 128
    percdamp: float = 0.01
    prunen: int = 0
    prunem: int = 0
    refit: bool = False
    seed: int = 0
    batch_size: int = 8
    max_shard_size: str = "5GB"
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes: a data-free tensor merge's working set
    moe_min_tokens: int | None = None  # None: the model's hidden size
    base_model_written: str = ""

    @property
    def method_spec(self) -> MethodSpec:
        return METHOD_SPECS[self.merge_method]

    def calibration_for(self, t: int) -> CalibrationConfig | None:
        """Calibration of fine-tuned model `t` (its own, else the shared one)."""
        return self.models[t].calibration or self.calibration

    def needs_calibration(self) -> bool:
        """Whether any tensor uses a data-aware trim (or the method needs Gram matrices)."""
        return self.method_spec.needs_grams or any(t in DATA_TRIMS for t in spec_values(self.trim))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for reports and model cards: model and data paths as the YAML wrote them.

        Shallow (parameter specs are shared, not copied).
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "base_model_written"}
        out["base_model"] = self.base_model_written or self.base_model
        out["models"] = [
            {
                "model": m.label,
                "parameters": dict(m.parameters),
                "calibration": m.calibration.to_dict() if m.calibration else None,
            }
            for m in self.models
        ]
        out["parameters"] = dict(self.parameters)
        out["calibration"] = self.calibration.to_dict() if self.calibration else None
        return out


def _memory_budget(value: Any, problems: list[str]) -> int:
    """`memory_budget` in bytes (a size such as 256MiB or 1GB, or a positive byte count)."""
    try:
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
            raise ConvertError("not a size")
        budget = parse_size(value if isinstance(value, str) else int(value))
    except ConvertError:
        budget = 0
    if budget < 1:
        problems.append(f"memory_budget must be a positive size such as 256MiB or 2GB, got {short_repr(value)}")
        return DEFAULT_MEMORY_BUDGET
    return budget


# --------------------------------------------------------------------------- specs


def resolve_spec(spec: Any, name: str, layer: int | None, num_layers: int) -> Any:
    """The value of a parameter spec for HF tensor `name` in decoder block `layer` (None: outside).

    `sgtv_jax.merge.paramspec.resolve`, with its errors as `ConfigError`.
    """
    try:
        return paramspec.resolve(spec, name, layer, num_layers)
    except paramspec.SpecError as e:
        raise ConfigError(str(e)) from None


# --------------------------------------------------------------------------- validation


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
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < minimum:
        problems.append(f"{where}{key} must be an integer >= {minimum}, got {short_repr(v)}")
        return default
    return int(v)


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
    if ps.kind == "int" and not isinstance(v, numbers.Integral):
        return f"must be an integer, got {short_repr(v)}"
    v = float(v)
    if not math.isfinite(v):
        return f"must be finite, got {v!r}"
    if (ps.lo is not None and v < ps.lo) or (ps.hi is not None and v > ps.hi):
        lo = "-inf" if ps.lo is None else float(ps.lo)
        hi = "inf" if ps.hi is None else float(ps.hi)
        return f"must be in [{lo}, {hi}], got {v!r}"
    return None


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


def parse_config(raw: Mapping[str, Any], root: str | Path = ".") -> MergeConfig:
    """Validate a config mapping (as read from YAML) into a `MergeConfig`; raises `ConfigError`."""
    root = Path(root)
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a YAML mapping, got {type(raw).__name__}")
    _unknown(raw, TOP_KEYS, "the config", problems)

    spec = _method(raw, problems)
    base_raw = raw.get("base_model")
    if base_raw is None:
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
    if spec is not None:
        _method_parameters(gparams, spec, problems)

    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        problems.append("models must be a non-empty list of {model: path, parameters: {...}}")
        models_raw = []
    entries = [e for i, m in enumerate(models_raw) if (e := _model_entry(i, m, base, root, problems)) is not None]

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
    tok = raw.get("tokenizer_source", "base")
    if tok != "base":
        problems.append(f"tokenizer_source {short_repr(tok)} is not supported: only 'base' (vocabularies must match)")
    hs = _choice(raw, "hessian_source", "merged", HESSIAN_SOURCES, problems)
    percdamp = raw.get("percdamp", 0.01)
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real) or not 0 <= float(percdamp) < math.inf:
        problems.append(f"percdamp must be a finite number >= 0, got {short_repr(percdamp)}")
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
    if isinstance(shard, bool) or not isinstance(shard, (str, numbers.Integral)):
        problems.append(f"max_shard_size must be a size such as 500MB or 5GB, got {short_repr(shard)}")
        shard = "5GB"
    budget = _memory_budget(raw.get("memory_budget", DEFAULT_MEMORY_BUDGET), problems)
    calib = _calibration(raw.get("calibration"), root, "calibration", problems)

    cfg = MergeConfig(
        base_model=base,
        models=tuple(entries),
        merge_method=spec.name if spec else "",
        parameters=gparams,
        trim=trim,
        dtype=DTYPES[dtype] if dtype is not None else None,
        tokenizer_source="base",
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
        base_model_written=base_raw if isinstance(base_raw, str) else "",
    )
    if spec is not None and entries and not problems:
        _cross_checks(cfg, spec, problems)
    if problems:
        raise ConfigError("invalid merge config:\n  - " + "\n  - ".join(problems))
    return cfg


def _cross_checks(cfg: MergeConfig, spec: MethodSpec, problems: list[str]) -> None:
    """Checks that combine keys (run once every key is valid on its own)."""
    n = len(cfg.models)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (
            f"exactly {spec.min_models}"
            if spec.max_models == spec.min_models
            else f"at least {spec.min_models}"
            if spec.max_models is None
            else f"{spec.min_models} to {spec.max_models}"
        )
        problems.append(f"merge_method {spec.name!r} merges {want} model(s) besides base_model, got {n} under models")
    if cfg.needs_calibration():
        for t in range(len(cfg.models)):
            if cfg.calibration_for(t) is None:
                problems.append(
                    f"trim {short_repr(cfg.trim)} / method {spec.name!r} needs calibration data: add "
                    f"'calibration: {{data: FILE}}' (top level, or models[{t}].calibration)"
                )
                break
    if cfg.trim is None and spec.default_trim is None:
        for t in range(len(cfg.models)):
            dens = model_parameters(cfg, t).get("density")
            if any(isinstance(v, numbers.Real) and v < 1 for v in spec_values(dens)):
                problems.append(
                    f"models[{t}] has density < 1 but merge_method {spec.name!r} does not trim by "
                    "itself: add 'trim: magnitude' (or sparsegpt, wanda, random, ...)"
                )
                break
    if cfg.prunem and not any(v == "sparsegpt" for v in spec_values(cfg.trim)):
        problems.append("prunen/prunem (N:M) need trim: sparsegpt")
    if cfg.refit and not any(v == "sparsegpt" for v in spec_values(cfg.trim)):
        problems.append("refit: true refits what OBS kept: it needs trim: sparsegpt")


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses aliases (`*name`): no alias bomb can expand.

    mergekit configs never need anchors; refusing aliases bounds the loaded
    size by the file's size.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise ConfigError(
                f"{self.name}:{ev.start_mark.line + 1}: YAML alias '*{str(ev.anchor)[:40]}' "
                "refused (aliases/anchors are not supported in merge configs; write the value out)"
            )
        return super().compose_node(parent, index)


def read_yaml(path: str | Path) -> Any:
    """The YAML document of `path` (UTF-8, no aliases); ConfigError naming the file and line."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    loader = _NoAliasLoader(text)
    loader.name = str(p)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{p}: YAML nested too deeply") from None
    finally:
        loader.dispose()


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


def model_parameters(cfg: MergeConfig, t: int) -> dict[str, Any]:
    """Model `t`'s per-model parameter specs, falling back to the top-level `parameters`."""
    out = {k: cfg.parameters[k] for k in PER_MODEL_PARAMS if k in cfg.parameters}
    out.update(cfg.models[t].parameters)
    return out


def method_kwargs(cfg: MergeConfig, name: str, layer: int | None, num_layers: int) -> dict[str, Any]:
    """Method parameters resolved for one tensor, under the method's keywords (`lambda` -> `lambda_`)."""
    spec = cfg.method_spec
    out = {}
    for k, value in cfg.parameters.items():
        if k in PER_MODEL_PARAMS:
            continue
        ps = spec.param(k)
        out[ps.keyword if ps is not None else k] = resolve_spec(value, name, layer, num_layers)
    return out
