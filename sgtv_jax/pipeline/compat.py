"""The PyTorch original's pipeline API on in-memory Flax NNX models (ours: `sgtv_jax.models`).

    pruned = sequential_layer_pruning(base_model, finetuned_models, calibration_loader,
                                      layer_names, density=0.5, blocksize=128, percdamp=0.01)
    # {"model.layers.0.self_attn.q_proj": [pruned task vector of model 0, of model 1, ...]}

* models: our Flax NNX models (`LlamaForCausalLM`, `GPT2LMHeadModel`, ...), e.g.
  from `convert.load_flax_model`;
* `calibration_loader`: an iterable of batches, each `input_ids` `[B, S]` or a
  dict with `input_ids` and optionally `attention_mask` (padding masked);
* `layer_names`: HF module names of linear layers (`model.layers.3.mlp.down_proj`);
* task vectors are returned in PyTorch layout `[out, in]` (`W_ft - W_base`).

Hessians are built from the *base* model's inputs, block by block through the
base model (like the pipeline's `base` Hessian source, `sgtv_jax.pipeline.sources`);
`TaskVectorImportanceCalculatorPerTask` builds each fine-tuned model's own. All numerics are `sgtv_jax.hessian` and
`sgtv_jax.obs.obs_prune`; the full merge with `merged` Hessians is
`sgtv_jax.pipeline.run_merge`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.hessian import hessian_finalize, hessian_init, hessian_update
from sgtv_jax.models import apply_block, split_block
from sgtv_jax.obs import obs_prune


def _batches(loader: Iterable[Any]) -> list[tuple[jax.Array, jax.Array]]:
    out = []
    for b in loader:
        if isinstance(b, dict):
            ids = np.asarray(b["input_ids"])
            mask = np.asarray(b.get("attention_mask", np.ones_like(ids)))
        else:
            ids = np.asarray(b)
            mask = np.ones_like(ids)
        if ids.ndim == 1:
            ids, mask = ids[None], mask[None]
        out.append((jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    if not out:
        raise ValueError("calibration_loader yielded no batches")
    return out


def _locate(model: Any, layer_names: Sequence[str]) -> dict[str, tuple[int, str]]:
    """layer name -> (block index, block-local linear name); ValueError naming unknown ones."""
    where, bad = {}, []
    for name in layer_names:
        found = None
        for i in range(len(model.blocks)):
            p = model.hf_block_prefix(i)
            if name.startswith(p) and name[len(p) :] in model.linear_names:
                found = (i, name[len(p) :])
        if found is None:
            bad.append(name)
        else:
            where[name] = found
    if bad:
        raise ValueError(
            f"unknown layer name(s) {bad}; expected e.g. {model.hf_block_prefix(0)}"
            f"{model.linear_names[0]} (linear layers: {', '.join(model.linear_names)})"
        )
    return where


def _kernel(model: Any, block: int, local: str) -> jax.Array:
    """PyTorch-layout weight `[out, in]` of a linear layer."""
    mod = model.blocks[block]
    for part in local.split("."):
        mod = getattr(mod, part)
    return jnp.asarray(mod.kernel[...]).T


def layer_hessians(model: Any, calibration_loader: Iterable[Any], layer_names: Sequence[str]) -> dict[str, jax.Array]:
    """`{layer_name: H [in, in]}` from `model`'s own inputs, block by block (padding masked)."""
    where = _locate(model, layer_names)
    last = max(b for b, _ in where.values())
    batches = _batches(calibration_loader)
    hidden = [model.embed(ids) for ids, _ in batches]
    kws = [model.block_kwargs(m, ids.shape[1], batch=ids.shape[0]) for ids, m in batches]
    out: dict[str, jax.Array] = {}
    for i in range(last + 1):
        g, st = split_block(model, i)
        wanted = {n: loc for n, (b, loc) in where.items() if b == i}
        acc: dict[str, Any] = {}
        for k, ((_, m), kw) in enumerate(zip(batches, kws)):
            if wanted:
                y, caps = apply_block(g, st, hidden[k], capture=True, **kw)
                for n, loc in wanted.items():
                    x = caps[loc]
                    acc[n] = hessian_update(acc.get(n) or hessian_init(x.shape[-1]), x, m)
            else:
                y = apply_block(g, st, hidden[k], capture=False, **kw)
            hidden[k] = y
        for n in wanted:
            out[n] = hessian_finalize(acc[n])
    return out


class TaskVectorImportanceCalculator:
    """Base-model Hessians for a set of layers, then OBS pruning of task vectors with them."""

    def __init__(self, base_model: Any, calibration_loader: Iterable[Any], percdamp: float = PERCDAMP):
        self.model = base_model
        self.calibration = list(calibration_loader)
        self.percdamp = percdamp
        self.hessians: dict[str, jax.Array] = {}

    def compute_hessians_for_layers(self, layer_names: Sequence[str]) -> dict[str, jax.Array]:
        """`{layer_name: H [in, in]}` (kept for pruning)."""
        self.hessians.update(layer_hessians(self.model, self.calibration, layer_names))
        return {n: self.hessians[n] for n in layer_names}

    def _hessian(self, layer_name: str) -> jax.Array:
        if layer_name not in self.hessians:
            raise KeyError(
                f"no Hessian for {layer_name!r}; call compute_hessians_for_layers first (have: {sorted(self.hessians)})"
            )
        return self.hessians[layer_name]

    def prune_task_vector_with_error_correction(
        self, layer_name: str, task_vector: Any, density: float, blocksize: int = BLOCKSIZE
    ) -> jax.Array:
        """OBS-pruned task vector `[out, in]` (or a stack `[T, out, in]`) keeping `density`."""
        pruned, _ = obs_prune(
            task_vector,
            self._hessian(layer_name),
            density=density,
            blocksize=blocksize,
            percdamp=self.percdamp,
            name=layer_name,
        )
        return pruned


class TaskVectorImportanceCalculatorPerTask(TaskVectorImportanceCalculator):
    """Per-task Hessians: fine-tuned model t on its own calibration data (one loader, or one per model)."""

    def __init__(self, finetuned_models: Sequence[Any], calibration_loaders: Any, percdamp: float = PERCDAMP):
        self.models = list(finetuned_models)
        loaders = calibration_loaders
        if not (
            isinstance(loaders, (list, tuple))
            and len(loaders) == len(self.models)
            and all(not hasattr(x, "shape") for x in loaders)
            and not isinstance(loaders[0], dict)
        ):
            loaders = [loaders] * len(self.models)
        self.calibrations = [list(x) for x in loaders]
        self.percdamp = percdamp
        self.hessians = {}

    def compute_hessians_for_layers(self, layer_names: Sequence[str]) -> dict[str, jax.Array]:
        """`{layer_name: H [T, in, in]}` (task t's from model t)."""
        per = [layer_hessians(m, c, layer_names) for m, c in zip(self.models, self.calibrations)]
        for n in layer_names:
            self.hessians[n] = jnp.stack([p[n] for p in per])
        return {n: self.hessians[n] for n in layer_names}

    def prune_task_vector_with_error_correction(
        self,
        layer_name: str,
        task_vector: Any,
        density: float,
        blocksize: int = BLOCKSIZE,
        task_index: int | None = None,
    ) -> jax.Array:
        """Prune a stack `[T, out, in]` with each task's H, or one `[out, in]` with task `task_index`'s."""
        h = self._hessian(layer_name)
        tv = jnp.asarray(task_vector)
        if tv.ndim == 2:
            if task_index is None:
                raise ValueError("a single task vector needs task_index (which model's Hessian)")
            h = h[task_index]
        pruned, _ = obs_prune(tv, h, density=density, blocksize=blocksize, percdamp=self.percdamp, name=layer_name)
        return pruned


def sequential_layer_pruning(
    base_model: Any,
    finetuned_models: Sequence[Any],
    calibration_loader: Iterable[Any],
    layer_names: Sequence[str],
    density: float = 0.5,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
) -> dict[str, list[jax.Array]]:
    """`{layer_name: [OBS-pruned task vector [out, in] of each fine-tuned model]}` with base-model Hessians."""
    calc = TaskVectorImportanceCalculator(base_model, calibration_loader, percdamp)
    calc.compute_hessians_for_layers(layer_names)
    where = _locate(base_model, layer_names)
    out = {}
    for name, (block, local) in where.items():
        w0 = _kernel(base_model, block, local)
        stack = jnp.stack([_kernel(m, block, local) - w0 for m in finetuned_models])
        pruned = calc.prune_task_vector_with_error_correction(name, stack, density, blocksize)
        out[name] = [pruned[t] for t in range(pruned.shape[0])]
    return out
