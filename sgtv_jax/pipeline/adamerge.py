"""`merge_method: adamerging` in `sgtv merge`: learn the coefficients, then merge by name with them.

    base and fine-tuned models -> Flax family models (float32; a LoRA adapter applied)
    windows of the top-level `calibration`, tokenised by the base's tokenizer
    sgtv_jax.merge.adamerging.merge_with_learned_coefficients
        (the config's trim, densities, gamma, rescale, count; PRNG seed `seed`;
        `batch_size` windows per step; a tqdm bar over the steps)
    -> the config as `task_arithmetic` with each model's `weight` the learned
       coefficients as filter rules (`adamerging.weight_rules`), calibration removed
    -> the usual data-free merge by tensor name (`datafree.DataFreeRun`)

Decisions:

* The merge after learning is the data-free one, not the Flax model the
  learning pass built: one writer for every method (sharded safetensors, the
  base's extra files, model card, reports), one tensor in memory at a time.
  For `magnitude` and `breadcrumbs` trims (layout-free, and one Flax parameter
  per HF tensor) it gives the learned merge's tensors to float32 rounding
  (tests/pipeline/test_adamerging_yaml.py). With `random`, the learning pass draws its
  masks with Flax parameter names and layouts and the merge with HF ones: the
  same densities and coefficients, other dropped entries (the coefficients were
  fit to one random drop and apply to another). Accepted, not refused: DARE's
  drop is random either way.
* The progress bar is a `jax.debug.callback` inside the one compiled scan
  (`learn_coefficients(callback=...)`): it shows steps as the device runs them
  and changes no value, so a run with the bar equals one without it.
* Memory: the learning pass holds the base, the fine-tuned models, their task
  vectors and the merged model as float32 pytrees (about `4 (2T + 2) P` bytes
  for `T` models of `P` parameters) plus one step's activations (each block's
  input, one block under `jax.checkpoint`, the logits of `batch_size` windows).
* `objective: entropy` (default) reads one top-level calibration set (per-model
  ones are refused by the config check); `objective: distill` reads each
  model's own `models[t].calibration` (the task's text, where its specialist's
  top-k distributions are computed once: `sgtv_jax.merge.distill`) and no
  top-level one. Windows are sampled by `calibration.seed`, the step order and
  the trim by the config's `seed`: the same config gives the same output.
* Under `jax.distributed` process 0 alone learns and merges (as for any merge
  without calibrated trims).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from convert.conversion import load_flax_model
from convert.lora import open_model
from sgtv_jax.errors import NumericsError
from sgtv_jax.merge import adamerging as ada
from sgtv_jax.merge.distill import merge_with_distilled_coefficients
from sgtv_jax.models import get_family
from sgtv_jax.pipeline.calibration import load_calibration, load_tokenizer
from sgtv_jax.pipeline.check import max_positions_of, read_hf_config
from sgtv_jax.pipeline.config import PER_MODEL_PARAMS, ConfigError, MergeConfig, model_parameters
from sgtv_jax.pipeline.planning import DEFAULTS

CALIBRATION_NEEDED = {
    "entropy": "merge_method 'adamerging' needs calibration data: add 'calibration: {data: FILE}'",
    "distill": "parameters.objective 'distill' needs each model's own calibration text (its specialist's "
    "targets): add models[t].calibration: {data: TASK_FILE} to every model",
}
"""The message when a config lacks the calibration its objective reads."""

MERGED_AS = "task_arithmetic"
"""The method the learned merge runs as: `adamerging`'s per-tensor step (`adamerging.adamerging`)."""

LEARNING_PARAMS = ("steps", "learning_rate", "init", "clip", "objective")
"""The learning pass's parameters: one value each, none carried over to the merge."""

TRIM_PARAMS = ("rescale", "count")
"""Method parameters that belong to the trim: they carry over to the merge; the others are the learning's."""


class Learned(NamedTuple):
    """A learning pass: the config that merges with its coefficients, the report section, its seconds."""

    config: MergeConfig
    report: dict[str, Any]
    seconds: float


def learning_options(cfg: MergeConfig) -> dict[str, Any]:
    """steps, learning_rate, init, clip, objective of an adamerging config (the spec's defaults where unset)."""
    spec = cfg.method_spec
    out = {}
    for k in LEARNING_PARAMS:
        ps = spec.param(k)
        assert ps is not None
        out[k] = cfg.parameters.get(k, ps.default)
    return out


def _per_model(cfg: MergeConfig, key: str) -> list[float]:
    """One plain value of per-model parameter `key` per model (the config check refused gradients / rules)."""
    return [float(model_parameters(cfg, t).get(key, DEFAULTS[key])) for t in range(len(cfg.models))]


def _load(path: str, adapter: str = "") -> Any:
    """A checkpoint (LoRA adapter applied) as its Flax family model, float32."""
    ckpt = open_model(path, adapter)
    try:
        return load_flax_model(ckpt)[0]
    finally:
        ckpt.close()


def _one_or_each(values: list[int], each: bool) -> int | list[int]:
    return values if each else values[0]


def learned_config(cfg: MergeConfig, coeffs: Any, block_prefix: Any) -> MergeConfig:
    """`cfg` as the `task_arithmetic` merge that applies learned coefficients `[L+1, T]` (`weight_rules`).

    Keeps the trim, densities, gamma and the trim's parameters (rescale, count);
    drops the learning's parameters and the calibration (the merge needs no data).
    """
    rules = ada.weight_rules(coeffs, block_prefix)
    models = tuple(
        dataclasses.replace(m, parameters={**m.parameters, "weight": rules[t]}, calibration=None)
        for t, m in enumerate(cfg.models)
    )
    params = {k: v for k, v in cfg.parameters.items() if k in TRIM_PARAMS or k in PER_MODEL_PARAMS}
    return dataclasses.replace(cfg, merge_method=MERGED_AS, parameters=params, models=models, calibration=None)


def learn_weights(cfg: MergeConfig, *, progress: bool = True) -> Learned:
    """Run the learning pass of an adamerging config (module doc); returns the merge's config and the report section.

    The report section: `coefficients` `[L+1][T]` (row `i < L` block `i`, row `L`
    every tensor outside the blocks), `losses` (the objective before each step: mean entropy, or distill's summed KL),
    `groups` (the HF name prefix of each row; "" for the last: everything else),
    `models`, the learning options, the trim and the calibration windows used.
    """
    t0 = time.perf_counter()
    opts = learning_options(cfg)
    distill = opts["objective"] == "distill"
    calibrations = [m.calibration for m in cfg.models] if distill else [cfg.calibration]
    if any(c is None for c in calibrations):  # the config check asks for them; a hand-built config may not have them
        raise ConfigError(CALIBRATION_NEEDED["distill" if distill else "entropy"])
    hf = read_hf_config(cfg.base_model)
    block_prefix = get_family(hf.get("model_type")).hf_block_prefix
    tok = load_tokenizer(cfg.base_model)
    calibs = [load_calibration(c, tok, max_positions_of(hf)) for c in calibrations]
    kind = cfg.trim
    # the trim's options as given: the plan interpreter resolves their defaults (trim_task_vectors)
    trim_options: dict[str, Any] = {k: cfg.parameters[k] for k in TRIM_PARAMS if k in cfg.parameters}
    if kind == "breadcrumbs":
        trim_options["gamma"] = _per_model(cfg, "gamma")
    base = _load(cfg.base_model)
    fts = [_load(m.model, m.adapter) for m in cfg.models]
    steps = int(opts["steps"])
    with tqdm(total=steps, desc=f"adamerging ({opts['objective']})", unit="step", disable=not progress) as bar:

        def on_step(step: Any, loss: Any) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

        learning: dict[str, Any] = dict(
            steps=steps,
            learning_rate=float(opts["learning_rate"]),
            init=float(opts["init"]),
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            clip=(0.0, 1.0) if opts["clip"] else None,
            trim=kind,
            densities=_per_model(cfg, "density"),
            trim_options=trim_options,
            callback=on_step if progress else None,
        )
        if distill:
            windows = [(c.input_ids, c.mask) for c in calibs]
            _, learned, losses_d = merge_with_distilled_coefficients(base, fts, windows, **learning)
        else:
            _, learned, losses_d = ada.merge_with_learned_coefficients(
                base, fts, calibs[0].input_ids, calibs[0].mask, **learning
            )
        coeffs, losses = np.asarray(jax.block_until_ready(learned)), np.asarray(losses_d)
        jax.effects_barrier()  # every step's callback has run before the bar closes
    del base, fts
    if not np.all(np.isfinite(losses)) or not np.all(np.isfinite(coeffs)):
        raise NumericsError(
            "adamerging: the learning diverged (a non-finite loss or coefficient); "
            "lower parameters.learning_rate or keep parameters.clip true"
        )
    blocks = coeffs.shape[0] - 1
    report = {
        "coefficients": coeffs.astype(float).tolist(),
        "losses": losses.astype(float).tolist(),
        "groups": [block_prefix(i) for i in range(blocks)] + [""],
        "models": [m.label for m in cfg.models],
        **{k: v for k, v in opts.items()},
        "trim": kind,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        # one set (entropy), or each task's own (distill): then one count per model
        "calibration_windows": _one_or_each([int(c.input_ids.shape[0]) for c in calibs], distill),
        "calibration_tokens": _one_or_each([int(c.tokens) for c in calibs], distill),
        "merged_as": f"{MERGED_AS}: models[t] weight = coefficients[group][t] (sgtv_jax.merge.adamerging.weight_rules)",
    }
    return Learned(learned_config(cfg, coeffs, block_prefix), report, time.perf_counter() - t0)
