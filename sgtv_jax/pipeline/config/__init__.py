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

The package: `model` (the dataclasses), `schema` (the declared YAML model and
its JSON Schema, `sgtv schema`), `yamlio`, `checks`, `cross`, `slices`,
`tokens` and `parse`; per-tensor resolution of the specs lives in
`sgtv_jax.pipeline.planning`.

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

from typing import Any

from sgtv_jax.merge.paramspec import layer_position, spec_values
from sgtv_jax.pipeline.config.checks import check_param, method_parameters
from sgtv_jax.pipeline.config.cross import model_parameters
from sgtv_jax.pipeline.config.model import (
    CALIBRATION_KEYS,
    MODEL_KEYS,
    PER_MODEL_PARAMS,
    TOP_KEYS,
    CalibrationConfig,
    ConfigError,
    MergeConfig,
    ModelEntry,
    SliceDef,
    SliceSource,
    TokenizerSpec,
    TokenSource,
)
from sgtv_jax.pipeline.config.parse import load_config, parse_config
from sgtv_jax.pipeline.config.schema import DEFAULT_MEMORY_BUDGET, DTYPES, HESSIAN_SOURCES
from sgtv_jax.pipeline.config.slices import slice_config, slice_roles
from sgtv_jax.pipeline.config.yamlio import read_yaml

__all__ = [
    "CALIBRATION_KEYS",
    "CalibrationConfig",
    "ConfigError",
    "DEFAULT_MEMORY_BUDGET",
    "DTYPES",
    "HESSIAN_SOURCES",
    "MODEL_KEYS",
    "MergeConfig",
    "ModelEntry",
    "PER_MODEL_PARAMS",
    "SliceDef",
    "SliceSource",
    "TOP_KEYS",
    "TokenSource",
    "TokenizerSpec",
    "check_param",
    "layer_position",
    "load_config",
    "method_kwargs",
    "method_parameters",
    "model_parameters",
    "parse_config",
    "read_yaml",
    "resolve_spec",
    "slice_config",
    "slice_roles",
    "spec_values",
]

# Per-tensor resolution belongs to planning (which imports this package): re-exported on first use.
_PLANNING = {"method_kwargs", "resolve_spec"}


def __getattr__(name: str) -> Any:
    if name in _PLANNING:
        from sgtv_jax.pipeline import planning  # noqa: PLC0415 (planning imports this package)

        return getattr(planning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
