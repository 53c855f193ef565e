"""A merge config's parameters for one tensor: HF tensor name and block -> `TensorPlan`.

Parameter specs (plain values, gradients over blocks, filter rules) are
resolved by `sgtv_jax.merge.paramspec` (through `resolve_spec`) for the
tensor's name and block. Per-model parameters come from each model's
`parameters`, else the top-level ones, else the method's default (per model:
one model lacking `gamma` leaves the others' values alone). A data-aware trim
(sparsegpt / wanda) applies to the linear layers of the blocks only; every
other tensor (norms, biases, embeddings, an untied head) uses the method's own
data-free trim.
"""

from __future__ import annotations

from typing import Any

from sgtv_jax.merge import paramspec
from sgtv_jax.merge.plan import ObsOptions, TensorPlan
from sgtv_jax.merge.specs import PER_MODEL_PARAMS
from sgtv_jax.merge.trim import DATA_TRIMS
from sgtv_jax.pipeline.config import PER_MODEL_PARAMS as PER_MODEL_NAMES
from sgtv_jax.pipeline.config import ConfigError, MergeConfig, model_parameters


def resolve_spec(spec: Any, name: str, layer: int | None, num_layers: int) -> Any:
    """The value of a parameter spec for HF tensor `name` in decoder block `layer` (None: outside).

    `sgtv_jax.merge.paramspec.resolve`, with its errors as `ConfigError`.
    """
    try:
        return paramspec.resolve(spec, name, layer, num_layers)
    except paramspec.SpecError as e:
        raise ConfigError(str(e)) from None


def method_kwargs(cfg: MergeConfig, name: str, layer: int | None, num_layers: int) -> dict[str, Any]:
    """Method parameters resolved for one tensor, under the method's keywords (`lambda` -> `lambda_`)."""
    spec = cfg.method_spec
    out = {}
    for k, value in cfg.parameters.items():
        ps = spec.param(k)
        if k in PER_MODEL_NAMES and ps is None:  # ram's top-level epsilon is its own parameter
            continue
        out[ps.keyword if ps is not None else k] = resolve_spec(value, name, layer, num_layers)
    return out


DEFAULTS = {ps.name: ps.default for ps in PER_MODEL_PARAMS}
"""The method default of each per-model parameter (density, weight, gamma, epsilon)."""


def per_model(cfg: MergeConfig, key: str, name: str, layer: int | None, num_layers: int) -> tuple[float, ...]:
    """Per-model parameter `key` (density, weight, gamma, epsilon) of every model for tensor `name`.

    A model without it (and no top-level value) takes the method's default.
    """
    specs = [model_parameters(cfg, t).get(key) for t in range(len(cfg.models))]
    try:
        values = paramspec.per_model(specs, name, DEFAULTS[key], layer, num_layers)
    except paramspec.SpecError as e:
        raise ConfigError(str(e)) from None
    return tuple(float(v) for v in values)


def trim_for(cfg: MergeConfig, name: str, layer: int | None, num_layers: int, linear: bool) -> str | None:
    """The configured trim of tensor `name`; None: the method's own (always so off the linear layers
    for data-aware trims)."""
    if cfg.trim is None:
        return None
    kind = resolve_spec(cfg.trim, name, layer, num_layers)
    if kind in DATA_TRIMS and not linear:
        return None
    return kind


def obs_options(cfg: MergeConfig) -> ObsOptions:
    """The config's OBS (sparsegpt) options."""
    return ObsOptions(
        blocksize=cfg.blocksize, percdamp=cfg.percdamp, prunen=cfg.prunen, prunem=cfg.prunem, refit=cfg.refit
    )


def plan_tensor(cfg: MergeConfig, name: str, layer: int | None, num_layers: int, *, linear: bool) -> TensorPlan:
    """The plan of tensor `name` in block `layer` (None: outside the blocks) of a `num_layers` model.

    `linear`: the tensor is a linear layer's weight with calibration statistics.
    """
    return TensorPlan(
        method=cfg.merge_method,
        name=name,
        weights=per_model(cfg, "weight", name, layer, num_layers),
        densities=per_model(cfg, "density", name, layer, num_layers),
        trim=trim_for(cfg, name, layer, num_layers, linear),
        params=method_kwargs(cfg, name, layer, num_layers),
        gamma=per_model(cfg, "gamma", name, layer, num_layers),
        epsilon=per_model(cfg, "epsilon", name, layer, num_layers),
        obs=obs_options(cfg),
        seed=cfg.seed,
    )
