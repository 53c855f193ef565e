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
``hessian_source`` (``base`` | ``per_task`` | ``merged`` | ``per_task_merged``), ``blocksize``,
``percdamp``, ``prunen`` / ``prunem``, ``refit`` (least-squares refit of the
entries OBS kept, see ``sgtv_jax.refit``), ``seed``, ``batch_size``,
``max_shard_size``, ``memory_budget`` (data-free merges: a tensor whose merge
needs more working memory than this, e.g. ``256MiB`` (the default), is merged
in row chunks that fit it, with the same bits), ``moe_min_tokens`` (MoE: the fewest routed calibration
tokens an expert needs for its own routing-weighted Hessian, default the
hidden size; see ``sgtv_jax.pipeline.streams``).
``devices`` (``all``, the default, or N: the device mesh of a calibrated merge,
``sgtv_jax.pipeline.mesh``) and ``hessian_accumulation`` (``float32``, the
default, or ``float64``: the dtype of the per-device partial Hessian sums,
``sgtv_jax.pipeline.streams.HessianSum``).

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

import copy
import dataclasses
import difflib
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import yaml

from convert.errors import ConvertError
from convert.lora import read_adapter_config
from sgtv_jax import numparse
from sgtv_jax.errors import SgtvError, short_repr
from sgtv_jax.merge import paramspec
from sgtv_jax.merge.paramspec import is_gradient, is_rules, layer_position, spec_values
from sgtv_jax.merge.plan import ObsOptions
from sgtv_jax.merge.specs import LEARNED_TRIMS, METHOD_SPECS, REFUSED, WITHOUT_EFFECT, MethodSpec, ParamSpec
from sgtv_jax.merge.specs import PER_MODEL_PARAMS as _PER_MODEL_SPECS
from sgtv_jax.merge.streaming import DEFAULT_BUDGET as DEFAULT_MEMORY_BUDGET
from sgtv_jax.merge.trim import DATA_TRIMS, TRIMS
from sgtv_jax.pipeline.chat_templates import AUTO, CHAT_TEMPLATES

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

HESSIAN_SOURCES = ("base", "per_task", "merged", "per_task_merged")
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
    "slices",
    "tokenizer",
    "chat_template",
    "out_dtype",
    "devices",
    "hessian_accumulation",
)
MODEL_KEYS = ("model", "parameters", "calibration")
PER_MODEL_PARAMS = tuple(p.name for p in _PER_MODEL_SPECS)
CALIBRATION_KEYS = ("data", "nsamples", "seqlen", "seed", "text_field")
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
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
    given: frozenset[str] = frozenset()  # the keys the YAML set (the rest are defaults or inherited)

    def inherit(self, top: CalibrationConfig | None) -> CalibrationConfig:
        """A model's own calibration with the top-level one's values for the keys it does not set (not `data`)."""
        if top is None:
            return self
        keys = [k for k in ("nsamples", "seqlen", "seed", "text_field") if k not in self.given]
        return dataclasses.replace(self, **{k: getattr(top, k) for k in keys})

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
class SliceSource:
    """One source of an output slice: decoder layers `[start, stop)` of `model` (resolved path).

    `parameters`: per-model parameter specs for this source only (they win over
    the slice's and the top-level ones); `adapter`: a LoRA adapter (``base+adapter``).
    """

    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any]
    written: str = ""
    adapter: str = ""

    @property
    def label(self) -> str:
        return self.written or self.model

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.label, "layer_range": list(self.layer_range), "parameters": dict(self.parameters)}


@dataclasses.dataclass(frozen=True)
class SliceDef:
    """One output slice (mergekit `slices[]`): its sources' layers merged, stacked after the previous slices.

    `base_model`: the slice's own base (resolved path; "" = the top-level one);
    `parameters`: specs for this slice, between the sources' and the top-level ones.
    """

    sources: tuple[SliceSource, ...]
    parameters: Mapping[str, Any]
    base_model: str = ""
    base_written: str = ""

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sources": [s.to_dict() for s in self.sources], "parameters": dict(self.parameters)}
        if self.base_model:
            out["base_model"] = self.base_written or self.base_model
        return out


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """Where one token's embedding row comes from (mergekit `tokenizer.tokens.<token>`).

    kind: "default" (the rules for a missing token), "zero", "model" (that
    model's row of this token) or "model_token" (that model's row of `token`
    / `token_id`); force: use it for every model, even those having the token.
    """

    kind: str
    model: str = ""
    written: str = ""
    token: str | None = None
    token_id: int | None = None
    force: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.written or self.model or None,
            "token": self.token,
            "token_id": self.token_id,
            "force": self.force,
        }


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary (`tokenizer_source`, or the `tokenizer:` block).

    source: "union", "base" or a model directory (resolved path) whose
    tokenizer is used; tokens: per-token embedding sources (tokens not in the
    vocabulary are added); pad_to_multiple_of: round the vocabulary size up.
    """

    source: str
    written: str = ""
    tokens: Mapping[str, TokenSource] = dataclasses.field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.written or self.source,
            "tokens": {k: v.to_dict() for k, v in self.tokens.items()},
            "pad_to_multiple_of": self.pad_to_multiple_of,
        }


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
    slices: tuple[SliceDef, ...] = ()
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    compute_dtype: str | None = None  # `dtype` as written when `out_dtype` sets the output's
    devices: str | int = "all"  # the mesh: "all" devices of every process, or the first N (pipeline.mesh)
    hessian_accumulation: str = "float32"  # or "float64": partial Hessian sums (pipeline.streams.HessianSum)
    # the mapping as given (the YAML): the model card's rerunnable config; two spellings of one merge stay equal
    written: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False)

    @property
    def method_spec(self) -> MethodSpec:
        return METHOD_SPECS[self.merge_method]

    def calibration_for(self, t: int) -> CalibrationConfig | None:
        """Calibration of fine-tuned model `t` (its own, else the shared one)."""
        return self.models[t].calibration or self.calibration

    def needs_calibration(self) -> bool:
        """Whether any tensor uses a data-aware trim (or the method needs Gram matrices, or learns its weights)."""
        spec = self.method_spec
        return spec.needs_grams or spec.learns_weights or any(t in DATA_TRIMS for t in spec_values(self.trim))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for reports and model cards: model and data paths as the YAML wrote them.

        Shallow (parameter specs are shared, not copied).
        """
        skip = ("base_model_written", "slices", "tokenizer", "compute_dtype", "written")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out["base_model"] = self.base_model_written or self.base_model
        if self.compute_dtype is not None:
            out["dtype"], out["out_dtype"] = self.compute_dtype, self.dtype
        if self.slices:
            out["slices"] = [s.to_dict() for s in self.slices]
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.to_dict()
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
    return numparse.collect_size(value, "memory_budget", DEFAULT_MEMORY_BUDGET, problems)


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
    if spec.learns_weights:
        _learned_weights_checks(cfg, spec, problems)
    if cfg.needs_calibration():
        if cfg.hessian_source in ("base", "merged") and not spec.learns_weights:
            own = [t for t, m in enumerate(cfg.models) if m.calibration is not None]
            if own:  # one shared set builds every Hessian: a model's own would be silently unused
                problems.append(
                    f"models[{own[0]}].calibration would be unused: hessian_source: {cfg.hessian_source} builds "
                    "every Hessian from one shared set, the top-level 'calibration'; a model's own calibration is "
                    "read only by hessian_source per_task / per_task_merged: move it to the top level or set "
                    "hessian_source: per_task"
                )
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


def _learned_weights_checks(cfg: MergeConfig, spec: MethodSpec, problems: list[str]) -> None:
    """What a method that learns its weights (adamerging) cannot take, each message naming the key.

    Its learning pass (`sgtv_jax.pipeline.adamerge`) runs whole Flax models:
    it trims every parameter with one density (and gamma) per model and one
    data-free trim, and learns every weight, so weights, calibration trims,
    per-tensor trims and per-tensor densities have no meaning there.
    """
    name = spec.name
    trim = cfg.trim
    if trim is not None and not isinstance(trim, str):
        problems.append(f"trim: merge_method {name!r} takes one trim name for every tensor, not filter rules")
    elif trim is not None and trim not in LEARNED_TRIMS:
        why = (
            "reads per-layer calibration statistics"
            if trim in DATA_TRIMS
            else "is not applied by its learning pass over whole models"
        )
        problems.append(
            f"trim {trim!r} {why}: merge_method {name!r} composes with the data-free trims {', '.join(LEARNED_TRIMS)}"
        )
    for k in ("steps", "learning_rate", "init", "clip"):
        v = cfg.parameters.get(k)
        if isinstance(v, (list, tuple)):
            problems.append(f"parameters.{k} must be one value for merge_method {name!r}, got {short_repr(v)}")
    init = cfg.parameters.get("init", 0.3)
    clip = cfg.parameters.get("clip", True)
    if clip is True and isinstance(init, numbers.Real) and not isinstance(init, bool) and not 0 <= float(init) <= 1:
        problems.append(
            f"parameters.init must be in [0, 1] while parameters.clip is true (the coefficients' range), got {init!r}"
        )
    if "weight" in cfg.parameters:
        problems.append(
            f"parameters.weight: merge_method {name!r} learns every model's weights; remove 'weight' "
            "(parameters.init sets where the learning starts)"
        )
    for t, m in enumerate(cfg.models):
        where = f"models[{t}]"
        if "weight" in m.parameters:
            problems.append(
                f"{where}.parameters.weight: merge_method {name!r} learns every model's weights; remove 'weight' "
                "(parameters.init sets where the learning starts)"
            )
        if m.calibration is not None:
            problems.append(
                f"{where}.calibration: merge_method {name!r} learns from one calibration set; give it at top "
                "level (calibration: {data: [task_a.txt, task_b.txt]} mixes the tasks' texts)"
            )
        for k in ("density", "gamma"):
            v = model_parameters(cfg, t).get(k)
            if isinstance(v, (list, tuple)):
                src = f"{where}.parameters.{k}" if k in m.parameters else f"parameters.{k}"
                problems.append(
                    f"{src} must be one number for merge_method {name!r} (its learning pass trims whole "
                    f"models, one {k} per model), got {short_repr(v)}"
                )


# --------------------------------------------------------------------------- tokenizer


def _model_ref(v: Any, root: Path, where: str, problems: list[str]) -> str:
    """A model directory named by a tokenizer key (`model:` prefix allowed), resolved against `root`."""
    if isinstance(v, str) and v.startswith("model:"):
        v = v[len("model:") :]
    path = _path(v, root, where, problems)
    if path and not Path(path).is_dir():
        problems.append(f"{where}: model directory {short_repr(v)} not found")
    return path


def _token_source(tok: str, v: Any, root: Path, problems: list[str]) -> TokenSource | None:
    where = f"tokenizer.tokens[{tok!r}]"
    if not isinstance(v, Mapping):
        problems.append(f"{where} must be a mapping with 'source' (and 'force'), got {short_repr(v)}")
        return None
    _unknown(v, TOKEN_KEYS, where, problems)
    force = v.get("force", False)
    if not isinstance(force, bool):
        problems.append(f"{where}.force must be true or false, got {short_repr(force)}")
        force = False
    src = v.get("source")
    if src is None:
        return TokenSource("default", force=force)
    if isinstance(src, str):
        return TokenSource("model", _model_ref(src, root, f"{where}.source", problems), src, force=force)
    if not isinstance(src, Mapping) or src.get("kind") not in ("zero", "model_token"):
        problems.append(
            f"{where}.source must be a model path, {{kind: zero}} or {{kind: model_token, model: path, "
            f"token: str | token_id: int}}, got {short_repr(src)}"
        )
        return None
    if src["kind"] == "zero":
        _unknown(src, ("kind",), f"{where}.source", problems)
        return TokenSource("zero", force=force)
    _unknown(src, ("kind", "model", "token", "token_id"), f"{where}.source", problems)
    token, token_id = src.get("token"), src.get("token_id")
    if (token is None) == (token_id is None):
        problems.append(f"{where}.source: give exactly one of 'token' and 'token_id'")
    elif token is not None and not isinstance(token, str):
        problems.append(f"{where}.source.token must be a string, got {short_repr(token)}")
    elif token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        problems.append(f"{where}.source.token_id must be an integer >= 0, got {short_repr(token_id)}")
    model = src.get("model")
    return TokenSource(
        "model_token",
        _model_ref(model, root, f"{where}.source.model", problems),
        model if isinstance(model, str) else "",
        token=token if isinstance(token, str) else None,
        token_id=token_id if isinstance(token_id, int) and not isinstance(token_id, bool) else None,
        force=force,
    )


def _tokenizer(raw: Mapping[str, Any], root: Path, problems: list[str]) -> TokenizerSpec | None:
    """`tokenizer_source` (union | base | a model path, `model:` prefix allowed) or the `tokenizer:` block."""
    legacy, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if legacy is not None and block is not None:
        problems.append("give either tokenizer_source or tokenizer (its 'source' key), not both")
        return None
    if block is None and legacy is None:
        return None
    if block is None:
        block = {"source": legacy}
        where = "tokenizer_source"
    else:
        where = "tokenizer.source"
        if not isinstance(block, Mapping):
            problems.append(
                f"tokenizer must be a mapping with source / tokens / pad_to_multiple_of, got {short_repr(block)}"
            )
            return None
        _unknown(block, TOKENIZER_KEYS, "tokenizer", problems)
    src = block.get("source", "union")
    if not isinstance(src, str) or not src:
        problems.append(f"{where} must be 'union', 'base' or a model path, got {short_repr(src)}")
        return None
    source = src if src in ("union", "base") else _model_ref(src, root, where, problems)
    tokens_raw = block.get("tokens") or {}
    tokens: dict[str, TokenSource] = {}
    if not isinstance(tokens_raw, Mapping):
        problems.append(
            f"tokenizer.tokens must be a mapping of token -> {{source, force}}, got {short_repr(tokens_raw)}"
        )
    else:
        for tok, v in tokens_raw.items():
            if not isinstance(tok, str) or not tok:
                problems.append(f"tokenizer.tokens: a token must be a non-empty string, got {short_repr(tok)}")
                continue
            if (ts := _token_source(tok, v, root, problems)) is not None:
                tokens[tok] = ts
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        problems.append(f"tokenizer.pad_to_multiple_of must be an integer >= 1, got {short_repr(pad)}")
        pad = None
    return TokenizerSpec(source, src, tokens, pad)


def _chat_template(v: Any, problems: list[str]) -> str | None:
    """The Jinja text of `chat_template` (a name of `chat_templates.CHAT_TEMPLATES`, `auto`, or Jinja)."""
    if v is None:
        return None
    if not isinstance(v, str):
        problems.append(f"chat_template must be a template name or Jinja text, got {short_repr(v)}")
        return None
    if v == AUTO or v in CHAT_TEMPLATES:
        return CHAT_TEMPLATES.get(v, v)
    if len(v) < 20 or "{" not in v:
        problems.append(
            f"chat_template {short_repr(v)} is neither a known template (auto, {', '.join(CHAT_TEMPLATES)}) "
            "nor Jinja text"
        )
        return None
    try:
        jinja2.Environment().parse(v)
    except jinja2.TemplateSyntaxError as e:
        problems.append(f"chat_template is not valid Jinja (line {e.lineno}): {e.message}")
        return None
    return v


# --------------------------------------------------------------------------- slices


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


def _per_model_params(p: Any, where: str, problems: list[str], allowed: Sequence[str] = PER_MODEL_PARAMS) -> dict:
    if p is None:
        return {}
    if not isinstance(p, Mapping):
        problems.append(f"{where} must be a mapping, got {short_repr(p)}")
        return {}
    p = dict(p)
    _unknown(p, allowed, where, problems)
    for ps in _PER_MODEL_SPECS:
        if ps.name in p:
            check_param(p[ps.name], ps, where, problems)
    return p


def _slices(raw: Any, root: Path, problems: list[str]) -> tuple[SliceDef, ...]:
    """`slices:` (mergekit's output slices), checked key by key; layer counts against the models come later."""
    if not isinstance(raw, list) or not raw:
        problems.append("slices must be a non-empty list of {sources: [{model: path, layer_range: [start, stop]}]}")
        return ()
    out = []
    for k, sl in enumerate(raw):
        where = f"slices[{k}]"
        if not isinstance(sl, Mapping):
            problems.append(f"{where} must be a mapping with 'sources', got {short_repr(sl)}")
            continue
        _unknown(sl, SLICE_KEYS, where, problems)
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
            _unknown(src, SOURCE_KEYS, w, problems)
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

    def construct_yaml_int(self, node: Any) -> Any:
        """An integer too long for Python's str -> int limit is a ConfigError naming the line, not a traceback."""
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise ConfigError(
                f"{self.name}:{node.start_mark.line + 1}: an integer of {len(str(node.value))} digits "
                "(more than Python converts); no setting needs that many"
            ) from None


_NoAliasLoader.add_constructor("tag:yaml.org,2002:int", _NoAliasLoader.construct_yaml_int)


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
