"""The merge YAML declared once (pydantic v2): every key, its type, default and range; its JSON Schema.

`MergeYaml` is the file's shape, nested models down to a token's source.
Leaf keys carry a `Declared` rule: the check that writes the project's message
(numbers through `sgtv_jax.numparse`, method and per-model parameter specs
through `values.check_param` and the method table `sgtv_jax.merge.specs`), the
value it converts to, and its JSON Schema. `problems(raw)` validates a mapping
and translates pydantic's `ValidationError` into the project's problem list
(`_translate`, the one place): an unknown key at any level is
``unknown key 'x' in WHERE (did you mean 'y'?)``; a leaf's own message names
its dotted key. Shape errors (a list where a mapping belongs, a missing
``model``) are left to the builders (`checks`, `slices`, `tokens`), which
word them for mergekit's shorthands. `settled(cls, raw)` gives a model's
values with every bad or missing key at its declared default, so the builders
read defaults from here. `json_schema()` is what `sgtv schema` prints; method
parameters appear per `merge_method` (``if`` / ``then``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_core import PydanticCustomError, core_schema

from sgtv_jax import defaults, numparse
from sgtv_jax.errors import short_repr
from sgtv_jax.merge.specs import METHOD_SPECS, PER_MODEL_PARAMS, WITHOUT_EFFECT, ParamSpec
from sgtv_jax.merge.trim import TRIMS
from sgtv_jax.pipeline.config.values import _suggest, check_param

DEFAULT_MEMORY_BUDGET = defaults.MEMORY_BUDGET
HESSIAN_SOURCES = ("base", "per_task", "merged", "per_task_merged")
ACCUMULATIONS = ("float32", "float64")
DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "fp32", "fp32": "fp32"}
_KEY = "\x00KEY\x00"  # where a message names its key; `_translate` writes the dotted key there
_NOT_STR = "\x01"  # marks a YAML key that is not a string (pydantic would skip it), shown as written


@dataclasses.dataclass(frozen=True)
class Declared:
    """A leaf key's rule: `check(v)` -> message with `_KEY` (None: fine), `convert(v)`, its JSON Schema.

    Used as `Annotated[T, Declared(...)]`; pydantic calls `check` instead of its own type check.
    """

    check: Callable[[Any], str | None]
    json: Mapping[str, Any]
    convert: Callable[[Any], Any] = lambda v: v

    def _validate(self, v: Any) -> Any:
        msg = self.check(v)
        if msg is not None:
            raise PydanticCustomError("sgtv", "{m}", {"m": msg})
        return self.convert(v)

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self._validate)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        return copy_json(self.json)


def copy_json(j: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh copy of a JSON Schema fragment (pydantic edits the dicts it is given)."""
    return {
        k: (copy_json(v) if isinstance(v, Mapping) else list(v) if isinstance(v, list) else v) for k, v in j.items()
    }


def number(
    *, integer: bool = False, lo: float | None = None, hi: float | None = None, need: str = "", none_ok: bool = False
) -> Declared:
    """A number by `numparse.problem` (`need`: the requirement's wording, else numparse's)."""

    def check(v: Any) -> str | None:
        if v is None and none_ok:
            return None
        why = numparse.problem(v, integer=integer, lo=lo, hi=hi)
        return None if why is None else f"{_KEY} {need or why}, got {numparse.show(v)}"

    js: dict[str, Any] = {"type": "integer" if integer else "number"}
    js |= {"minimum": lo} if lo is not None else {}
    js |= {"maximum": hi} if hi is not None else {}
    js = {"anyOf": [js, {"type": "null"}]} if none_ok else js
    return Declared(check, js, lambda v: v if v is None else int(v) if integer else float(v))


def size(*, to_bytes: bool) -> Declared:
    """A size (``256MiB``, ``5GB`` or a byte count) by `numparse.size_problem`."""

    def check(v: Any) -> str | None:
        why = numparse.size_problem(v)[1]
        return None if why is None else f"{_KEY} {why}, got {numparse.show(v)}"

    js = {
        "anyOf": [
            {"type": "string", "pattern": r"^\s*[0-9.eE+-]+\s*([KkMmGgTt][Ii]?[Bb]|[Bb])?\s*$"},  # SIZE_UNITS, any case
            {"type": "integer", "minimum": 1},
        ]
    }
    return Declared(check, js, (lambda v: numparse.size_problem(v)[0]) if to_bytes else str)


def boolean() -> Declared:
    """YAML true / false only (a quoted "false" is a string)."""
    return Declared(
        lambda v: None if isinstance(v, bool) else f"{_KEY} must be true or false, got {short_repr(v)}",
        {"type": "boolean"},
    )


def choice(known: Sequence[str], wording: str, none_ok: bool = False) -> Declared:
    """One of `known` (or null when `none_ok`); `wording` formats the message from key, value and suggestion."""

    def check(v: Any) -> str | None:
        if (isinstance(v, str) and v in known) or (v is None and none_ok):
            return None
        return wording.format(key=_KEY, v=short_repr(v), hint=_suggest(v, known), known=", ".join(known))

    return Declared(check, {"enum": list(known) + ([None] if none_ok else [])})


def _devices(v: Any) -> str | None:
    if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return None
    return f"{_KEY} must be 'all' or a positive integer, got {short_repr(v)}"


_LEAF_JSON: dict[str, dict[str, Any]] = {
    "bool": {"type": "boolean"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
}


def _leaf_json(ps: ParamSpec) -> dict[str, Any]:
    js = {"enum": list(ps.choices)} if ps.kind == "choice" else dict(_LEAF_JSON[ps.kind])
    if ps.kind in ("int", "float"):
        js |= {"minimum": ps.lo} if ps.lo is not None and not ps.lo_open else {}
        js |= {"exclusiveMinimum": ps.lo} if ps.lo is not None and ps.lo_open else {}
        js |= {"maximum": ps.hi} if ps.hi is not None and ps.hi != float("inf") else {}
    return js


_RULE = {  # one filter rule; its value is a spec again (checked by sgtv, left open here)
    "type": "object",
    "properties": {"filter": {"type": "string"}, "value": {}},
    "required": ["value"],
    "additionalProperties": False,
}


def spec_json(leaf: Mapping[str, Any], gradient: bool, doc: str = "") -> dict[str, Any]:
    """A parameter spec: a plain value, a gradient over the blocks (floats), or filter rules."""
    plain = [dict(leaf)] + ([{"type": "array", "items": dict(leaf), "minItems": 1}] if gradient else [])
    out: dict[str, Any] = {"anyOf": plain + [{"type": "array", "items": _RULE, "minItems": 1}]}
    return out | ({"description": doc} if doc else {})


def param(ps: ParamSpec) -> Declared:
    """A method or per-model parameter spec, checked by `check_param` against its row of the table."""

    def check(v: Any) -> str | None:
        found: list[str] = []
        check_param(v, ps, "", found)
        return "\n".join(_KEY + p[len(ps.name) :] for p in found) or None

    js = spec_json(_leaf_json(ps), ps.kind == "float", ps.doc)
    if ps.default is not None:
        js["default"] = ps.default
    return Declared(check, js)


class Strict(BaseModel):
    """A mapping of the YAML: unknown keys are problems (with a suggestion), values are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _string_keys(cls, data: Any) -> Any:
        """A key that is not a string (YAML ``1:``) becomes a marked string, so it is reported as unknown."""
        if isinstance(data, Mapping) and not all(isinstance(k, str) for k in data):
            return {k if isinstance(k, str) else _NOT_STR + short_repr(k): v for k, v in data.items()}
        return data


PerModelParams: type[Strict] = create_model(  # type: ignore[call-overload]
    "PerModelParams",
    __base__=Strict,
    __doc__="Per-model parameters (a model's own, a slice source's, or the top-level default for all).",
    **{ps.name: (Annotated[Any, param(ps)], ps.default) for ps in PER_MODEL_PARAMS},
)


class CalibrationSettings(Strict):
    """Calibration windows: how many, how long, which draw, which JSONL field."""

    nsamples: Annotated[int, number(integer=True, lo=1)] = 128
    seqlen: Annotated[int, number(integer=True, lo=1)] = 512
    seed: Annotated[int, number(integer=True, lo=0)] = 0
    text_field: Annotated[
        str,
        Declared(
            lambda v: None if isinstance(v, str) else f"{_KEY} must be a string, got {short_repr(v)}",
            {"type": "string"},
        ),
    ] = "text"


class CalibrationYaml(CalibrationSettings):
    """Calibration data: a .txt / .jsonl file or a list of them (a bare file or list is shorthand for `data`)."""

    data: str | list[str]


Calibration = str | list[str] | CalibrationYaml


class ModelYaml(Strict):
    """One fine-tuned model (a bare path string is shorthand for `model`)."""

    model: str = Field(description="model directory; 'base+adapter' applies a PEFT LoRA adapter")
    parameters: PerModelParams | None = None  # type: ignore[valid-type]
    calibration: Calibration | None = Field(None, description="this model's own calibration (hessian_source per_task)")


class SourceYaml(Strict):
    """One source of an output slice: decoder layers [start, stop) of `model`."""

    model: str
    layer_range: list[Annotated[int, Field(ge=0)]] = Field(min_length=2, max_length=2)
    parameters: PerModelParams | None = None  # type: ignore[valid-type]


class SliceYaml(Strict):
    """One output slice: its sources' layers merged, stacked after the previous slices."""

    sources: list[SourceYaml] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="method parameters for this slice")


class ZeroSource(Strict):
    kind: Literal["zero"]


class ModelTokenSource(Strict):
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: Annotated[int, Field(ge=0)] | None = None


class TokenYaml(Strict):
    """Where one token's embedding row comes from."""

    source: str | Annotated[ZeroSource | ModelTokenSource, Field(discriminator="kind")] | None = None
    force: Annotated[bool, boolean()] = False


class TokenizerYaml(Strict):
    """The output vocabulary: `source` (union, base or a model directory), extra tokens, padding."""

    source: str = "union"
    tokens: dict[str, TokenYaml] | None = None
    pad_to_multiple_of: Annotated[int | None, number(integer=True, lo=1, none_ok=True)] = None


_DTYPE = choice(list(DTYPES), "{key} {v} is not supported{hint}", none_ok=True)


class Settings(Strict):
    """The top-level keys with one plain value each (defaults as a merge uses them)."""

    dtype: Annotated[str | None, _DTYPE] = Field(None, description="compute (and output) dtype")
    out_dtype: Annotated[str | None, _DTYPE] = Field(None, description="output dtype when it differs from dtype")
    hessian_source: Annotated[str, choice(HESSIAN_SOURCES, "unknown {key} {v}{hint}; one of {known}")] = "merged"
    blocksize: Annotated[int, number(integer=True, lo=1)] = defaults.BLOCKSIZE
    percdamp: Annotated[float, number(lo=0, need="must be a finite number >= 0")] = defaults.PERCDAMP
    prunen: Annotated[int, number(integer=True, lo=0)] = 0
    prunem: Annotated[int, number(integer=True, lo=0)] = 0
    refit: Annotated[bool, boolean()] = False
    seed: Annotated[int, number(integer=True, lo=0)] = 0
    batch_size: Annotated[int, number(integer=True, lo=1)] = 8
    max_shard_size: Annotated[str, size(to_bytes=False)] = "5GB"
    memory_budget: Annotated[int, size(to_bytes=True)] = Field(
        DEFAULT_MEMORY_BUDGET, description="bytes, or a size such as 256MiB"
    )
    moe_min_tokens: Annotated[int | None, number(integer=True, lo=1, none_ok=True)] = None
    devices: Annotated[
        str | int, Declared(_devices, {"anyOf": [{"const": "all"}, {"type": "integer", "minimum": 1}]})
    ] = "all"
    hessian_accumulation: Annotated[str, choice(ACCUMULATIONS, "{key} must be float32 or float64, got {v}")] = "float32"


def _trim_json() -> dict[str, Any]:
    return spec_json({"enum": list(TRIMS)}, gradient=False, doc="trim name, or filter rules choosing one per tensor")


class Structure(Strict):
    """The top-level keys naming models, method, parameters, trim, data and vocabulary."""

    merge_method: Annotated[str, Declared(lambda v: None, {"enum": list(METHOD_SPECS)})]
    base_model: str | None = None
    models: list[str | ModelYaml] | None = None
    slices: list[SliceYaml] | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="method parameters (per merge_method) and per-model defaults"
    )
    trim: Annotated[Any, Declared(lambda v: None, _trim_json())] = None
    calibration: Calibration | None = None
    tokenizer_source: str | None = Field(None, description="union, base, or a model directory")
    tokenizer: TokenizerYaml | None = None
    chat_template: str | None = Field(None, description="a template name, auto, or Jinja text")


class MergeYaml(Settings, Structure):
    """A merge config: mergekit's YAML plus sgtv's calibration / OBS keys."""

    model_config = ConfigDict(title="sgtv merge config", json_schema_extra=lambda s: _per_method(s))


def _params_model(name: str) -> dict[str, Any]:
    """The JSON Schema of `parameters` under merge_method `name`: its table row, per-model defaults, no-ops."""
    spec = METHOD_SPECS[name]
    own = {ps.name for ps in spec.params}  # a method's own parameter wins over a per-model one (ram's epsilon)
    shared = tuple(ps for ps in PER_MODEL_PARAMS if ps.name not in own)
    fields: dict[str, Any] = {ps.name: (Annotated[Any, param(ps)], ps.default) for ps in spec.params + shared}
    fields |= {k: (Annotated[bool, boolean()], False) for k in WITHOUT_EFFECT}
    return create_model(f"{name}_parameters", __base__=Strict, **fields).model_json_schema()


def _per_method(schema: dict[str, Any]) -> None:
    """Adds one ``if merge_method == m then parameters: <m's>`` per method (draft 2020-12)."""
    schema["allOf"] = [
        {
            "if": {"properties": {"merge_method": {"const": m}}, "required": ["merge_method"]},
            "then": {"properties": {"parameters": _params_model(m)}},
        }
        for m in METHOD_SPECS
    ]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the merge YAML (what `sgtv schema` prints); filter rules as one shared `$defs` entry."""
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema"} | _share_rule(MergeYaml.model_json_schema())
    out["$defs"]["FilterRule"] = copy_json(_RULE)
    return out


def _share_rule(js: Any) -> Any:
    """`js` with each inlined `_RULE` replaced by a reference (pydantic resolves refs while it generates)."""
    if js == _RULE:
        return {"$ref": "#/$defs/FilterRule"}
    if isinstance(js, dict):
        return {k: _share_rule(v) for k, v in js.items()}
    return [_share_rule(v) for v in js] if isinstance(js, list) else js


def keys(cls: type[BaseModel]) -> tuple[str, ...]:
    """The keys a mapping of `cls` may have, in declaration order."""
    return tuple(f.alias or n for n, f in cls.model_fields.items())


# --------------------------------------------------------------------------- errors


def _members(tp: Any) -> tuple[Any, ...]:
    """The types a field annotation may hold (Annotated and Optional unwrapped)."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(tp) for m in _members(a))
    return (tp,)


def _step(tp: Any, loc: Sequence[Any]) -> tuple[Any, str, int]:
    """(the type at `loc[0]` inside `tp`, how the step reads in a key path, loc items used)."""
    for m in _members(tp):
        if isinstance(m, type) and issubclass(m, BaseModel):
            if loc[0] == m.__name__:
                return m, "", 1
            f = m.model_fields.get(loc[0]) if isinstance(loc[0], str) else None
            if f is not None:
                return f.annotation, f".{loc[0]}", 1
        if isinstance(loc[0], str) and loc[0].startswith("tagged-union["):
            tag = _tag_class(tp, loc[1]) if len(loc) > 1 else ""
            member = next((x for x in _members(tp) if isinstance(x, type) and x.__name__ == tag), Any)
            return member, "", 2
        origin = typing.get_origin(m)
        if origin is list and isinstance(loc[0], int):
            return typing.get_args(m)[0], f"[{loc[0]}]", 1
        if origin is dict and not isinstance(loc[0], int):
            return typing.get_args(m)[1], f"[{loc[0]!r}]", 1
    return Any, f".{loc[0]}" if isinstance(loc[0], str) else f"[{loc[0]!r}]", 1


def _tag_class(tp: Any, tag: Any) -> str:
    for m in _members(tp):
        if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields:
            if tag in typing.get_args(m.model_fields["kind"].annotation):
                return m.__name__
    return ""


def _where(loc: Sequence[Any]) -> tuple[str, type[BaseModel]]:
    """(the dotted key of `loc` as the messages write it, the mapping's model there: MergeYaml if none)."""
    tp: Any = MergeYaml
    path, i = "", 0
    while i < len(loc):
        tp, text, used = _step(tp, loc[i:])
        path, i = path + text, i + used
    holder = next((m for m in _members(tp) if isinstance(m, type) and issubclass(m, BaseModel)), MergeYaml)
    return path.lstrip("."), holder


def _translate(err: ValidationError) -> list[str]:
    """pydantic's errors as the project's problems (shape errors are the builders' to word: skipped)."""
    out: list[str] = []
    for e in err.errors(include_url=False):
        loc = e["loc"]
        if e["type"] == "extra_forbidden":
            parent, holder = _where(loc[:-1])
            key = loc[-1]
            marked = isinstance(key, str) and key.startswith(_NOT_STR)
            shown = str(key)[1:] if marked else short_repr(key)
            hint = _suggest(None if marked else key, keys(holder))
            msg = f"unknown key {shown} in {parent or 'the config'}{hint}"
        elif e["type"] == "sgtv":
            msg = str((e.get("ctx") or {})["m"]).replace(_KEY, _where(loc)[0])
        else:
            continue
        if msg not in out:
            out.extend(m for m in msg.split("\n") if m not in out)
    return out


def problems(raw: Mapping[str, Any]) -> list[str]:
    """Every problem of the YAML mapping `raw` the declared model finds (unknown keys, leaf values)."""
    try:
        MergeYaml.model_validate(dict(raw))
    except ValidationError as e:
        return _translate(e)
    return []


def settled(cls: type[Strict], raw: Mapping[str, Any]) -> Any:
    """`cls` from the keys of `raw` it declares, each bad one left at its declared default."""
    known = set(keys(cls))
    keep = {k: v for k, v in raw.items() if k in known}
    while True:
        try:
            return cls.model_validate(keep)
        except ValidationError as e:
            bad = {err["loc"][0] for err in e.errors() if err["loc"]}
            if not bad & keep.keys():
                raise
            keep = {k: v for k, v in keep.items() if k not in bad}
