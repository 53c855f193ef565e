"""The validated merge configuration: frozen dataclasses (`MergeConfig` and its parts) and the key names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sgtv_jax.errors import SgtvError
from sgtv_jax.merge.paramspec import spec_values
from sgtv_jax.merge.specs import METHOD_SPECS, MethodSpec
from sgtv_jax.merge.specs import PER_MODEL_PARAMS as _PER_MODEL_SPECS
from sgtv_jax.merge.trim import DATA_TRIMS
from sgtv_jax.pipeline.config import schema

# The key names and defaults, from the declared schema (declared once there).
TOP_KEYS = schema.keys(schema.MergeYaml)
MODEL_KEYS = schema.keys(schema.ModelYaml)
PER_MODEL_PARAMS = tuple(p.name for p in _PER_MODEL_SPECS)
CALIBRATION_KEYS = schema.keys(schema.CalibrationYaml)
_TOP = {n: f.default for n, f in schema.Settings.model_fields.items()}
_CAL = {n: f.default for n, f in schema.CalibrationSettings.model_fields.items()}


class ConfigError(SgtvError):
    """An invalid merge configuration; the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data: `data` files (.txt / .jsonl), `nsamples` windows of `seqlen` tokens.

    `data` holds resolved paths; `written` the same files as the YAML wrote them.
    """

    data: tuple[str, ...]
    nsamples: int = _CAL["nsamples"]
    seqlen: int = _CAL["seqlen"]
    seed: int = _CAL["seed"]
    text_field: str = _CAL["text_field"]
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
    hessian_source: str = _TOP["hessian_source"]
    blocksize: int = _TOP["blocksize"]
    percdamp: float = _TOP["percdamp"]
    prunen: int = _TOP["prunen"]
    prunem: int = _TOP["prunem"]
    refit: bool = _TOP["refit"]
    seed: int = _TOP["seed"]
    batch_size: int = _TOP["batch_size"]
    max_shard_size: str = _TOP["max_shard_size"]
    memory_budget: int = _TOP["memory_budget"]  # bytes: a data-free tensor merge's working set
    moe_min_tokens: int | None = None  # None: the model's hidden size
    base_model_written: str = ""
    slices: tuple[SliceDef, ...] = ()
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    compute_dtype: str | None = None  # `dtype` as written when `out_dtype` sets the output's
    devices: str | int = _TOP["devices"]  # the mesh: "all" devices of every process, or the first N (pipeline.mesh)
    hessian_accumulation: str = _TOP[
        "hessian_accumulation"
    ]  # or "float64": partial Hessian sums (pipeline.streams.HessianSum)
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
