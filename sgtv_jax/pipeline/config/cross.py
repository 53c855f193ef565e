"""Checks that combine keys (model counts, calibration, learned weights), run once each key is valid."""

from __future__ import annotations

import numbers
from typing import Any

from sgtv_jax.errors import short_repr
from sgtv_jax.merge.paramspec import spec_values
from sgtv_jax.merge.specs import LEARNED_TRIMS, MethodSpec
from sgtv_jax.merge.trim import DATA_TRIMS
from sgtv_jax.pipeline.config.model import PER_MODEL_PARAMS, MergeConfig


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
        _missing_data_checks(cfg, spec, problems)
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


PER_TASK_SOURCES = ("per_task", "per_task_merged")
"""Hessian sources with one calibration set per model: there a model may go without (`proxy_gram`)."""


def _proxy_stands_in(cfg: MergeConfig, spec: MethodSpec) -> bool:
    """Whether a model without data can fit its proxy Gram alone: per-task Hessians, every tensor's
    `proxy_gram` > 0, and no per-model data trim (`regmean_sparse` trims the merged vector on the summed Grams)."""
    ps = spec.param("proxy_gram")
    if ps is None or cfg.hessian_source not in PER_TASK_SOURCES:
        return False
    betas = spec_values(cfg.parameters.get("proxy_gram", ps.default))  # validated numbers (or a bool: refused)
    per_model_trim = not spec.trims_merged and any(t in DATA_TRIMS for t in spec_values(cfg.trim))
    return not per_model_trim and bool(betas) and all(isinstance(v, (int, float)) and v > 0 for v in betas)


def _missing_data_checks(cfg: MergeConfig, spec: MethodSpec, problems: list[str]) -> None:
    """A merge that needs calibration data: every model has some, or (`_proxy_stands_in`) at least one does."""
    if spec.learns_weights and cfg.parameters.get("objective") == "distill":
        return  # distill names each model's own set itself (_learned_calibration_checks): a top-level one would not do
    missing = [t for t in range(len(cfg.models)) if cfg.calibration_for(t) is None]
    if not missing or (_proxy_stands_in(cfg, spec) and len(missing) < len(cfg.models)):
        return
    hint = ""
    if spec.param("proxy_gram") is not None:
        hint = (
            "; or, with hessian_source: per_task, set parameters.proxy_gram > 0 so a model without data fits its "
            "task vector's proxy Gram (at least one model needs data; none at all: merge_method wudi is data-free)"
        )
    problems.append(
        f"trim {short_repr(cfg.trim)} / method {spec.name!r} needs calibration data: add "
        f"'calibration: {{data: FILE}}' (top level, or models[{missing[0]}].calibration){hint}"
    )


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
    for k in ("steps", "learning_rate", "init", "clip", "objective"):
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
    distill = cfg.parameters.get("objective") == "distill"
    _learned_calibration_checks(cfg, name, distill, problems)
    for t, m in enumerate(cfg.models):
        where = f"models[{t}]"
        if "weight" in m.parameters:
            problems.append(
                f"{where}.parameters.weight: merge_method {name!r} learns every model's weights; remove 'weight' "
                "(parameters.init sets where the learning starts)"
            )
        for k in ("density", "gamma"):
            v = model_parameters(cfg, t).get(k)
            if isinstance(v, (list, tuple)):
                src = f"{where}.parameters.{k}" if k in m.parameters else f"parameters.{k}"
                problems.append(
                    f"{src} must be one number for merge_method {name!r} (its learning pass trims whole "
                    f"models, one {k} per model), got {short_repr(v)}"
                )


def _learned_calibration_checks(cfg: MergeConfig, name: str, distill: bool, problems: list[str]) -> None:
    """Entropy learns from one top-level calibration set; distill from each model's own (its specialist's text)."""
    if not distill:
        for t, m in enumerate(cfg.models):
            if m.calibration is not None:
                problems.append(
                    f"models[{t}].calibration: merge_method {name!r} learns from one calibration set; give it at "
                    "top level (calibration: {data: [task_a.txt, task_b.txt]} mixes the tasks' texts), or set "
                    "parameters.objective: distill (each model's own text)"
                )
        return
    lacking = [t for t, m in enumerate(cfg.models) if m.calibration is None]
    if lacking:
        problems.append(
            f"models[{lacking[0]}].calibration: parameters.objective 'distill' needs each model's own calibration "
            f"text (its specialist's targets); add models[t].calibration: {{data: TASK_FILE}} to models {lacking}"
        )
    if cfg.calibration is not None:
        problems.append(
            "calibration: unused with parameters.objective 'distill' (each task distills on its own "
            "models[t].calibration); remove the top-level calibration"
        )


def model_parameters(cfg: MergeConfig, t: int) -> dict[str, Any]:
    """Model `t`'s per-model parameter specs, falling back to the top-level `parameters`."""
    out = {k: cfg.parameters[k] for k in PER_MODEL_PARAMS if k in cfg.parameters}
    out.update(cfg.models[t].parameters)
    return out
