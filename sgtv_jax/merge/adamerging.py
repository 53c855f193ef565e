"""Learned merge coefficients (AdaMerging, layer-wise): entropy minimisation with optax.

The merged parameters are `theta = base + sum_t lambda[g(p), t] * tau_t[p]`,
one coefficient per task `t` and parameter group `g` (for a Flax family model:
one group per transformer block, and group `L` = number of blocks for every
parameter outside the blocks: embeddings, final norm, head). The coefficients
minimise the mean entropy of the merged model's next-token distributions over
unlabeled calibration tokens (AdaMerging, Yang et al. 2024), by Adam (optax)
under `jax.lax.scan`; no labels are read. The other objective (`OBJECTIVES`),
`distill`, sums each task's KL to its own specialist on its own text
(`sgtv_jax.merge.distill`); `learn_merge` takes either.

* `entropy(logits [B,S,V], mask [B,S])`: mean predictive entropy, log-softmax based.
* `layerwise_merge(base, taus, coeffs [G,T], groups)`: the merged pytree.
* `learn_coefficients(loss_fn, base, taus, batches, ...)`: `(coeffs [G,T], losses [steps])`.
* Flax models (`sgtv_jax.models`): `param_groups`, `stack_task_vectors`,
  `merged_logits` (each block's merge and forward under `jax.checkpoint`, so a
  step holds one block's merged weights and activations, plus each block's
  input), `entropy_loss`, and `merge_with_learned_coefficients`.
* `weight_rules(coeffs, hf_block_prefix)`: the learned coefficients as the
  per-model `weight` specs of a `task_arithmetic` YAML merge (`sgtv merge`).
* `adamerging(deltas, weights, ...)`: the per-tensor step, registered as merge
  method `adamerging` (`registry.METHODS`): task arithmetic with the learned
  coefficients of the tensor's group as `weights`. `sgtv merge` with
  `merge_method: adamerging` learns them first (`sgtv_jax.pipeline.adamerge`).

Task vectors may be trimmed first (`sgtv_jax.merge.trim.trim`, e.g.
`magnitude` for TIES' trim, `random` for DARE); the coefficients then scale
the trimmed vectors.

Coefficients are projected onto `clip` (default `[0, 1]`, the range the
AdaMerging reference code clamps to) after every step: entropy has a
degenerate direction, since scaling task vectors up sharpens every prediction
(overconfident, not better) and lowers the entropy without bound, and
negative coefficients move against what a task learned. Projection (not a
clamp inside the loss) keeps the gradient of a coefficient at the bound, so it
can come back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sgtv_jax.defaults import BLOCKSIZE, MAX_LEARNING_STEPS, PERCDAMP
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.combine import weighted_sum
from sgtv_jax.merge.methods import Floats, generalized_task_arithmetic, resolve_rescale
from sgtv_jax.merge.trim import Calibration

LossFn = Callable[[jax.Array, Any, Any, Any], jax.Array]
"""`loss_fn(coeffs [G,T], base, taus, batch) -> scalar`."""

StepCallback = Callable[[jax.Array, jax.Array], None]
"""`callback(step, loss)`: called on the host after each learning step (progress bars, logs)."""

OBJECTIVES = ("entropy", "distill")
"""What the coefficients minimise: the merged model's prediction entropy, or each task's KL to its specialist."""

BLOCKS = "blocks"
"""The key of a Flax family model's block list in its `nnx.State`."""

FLAX_TRIMS = ("magnitude", "random", "breadcrumbs")
"""Trims `merge_with_learned_coefficients` applies itself: the ones that read no
calibration statistics and do not depend on the kernel layout (Flax `[in, out]`
here, PyTorch `[out, in]` elsewhere); trim the task vectors yourself for others."""


def work_dtype(dtype: Any) -> Any:
    """At least float32 (float64 stays float64, for float64 references)."""
    return jnp.promote_types(dtype, jnp.float32)


def entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean entropy of `softmax(logits)` over positions with `mask != 0`; scalar.

    logits `[B, S, V]` (any float dtype; computed in at least float32), mask
    `[B, S]`. `H = -sum_v p_v log p_v` from `log_softmax` (stable for any
    logit scale); a `-inf` logit contributes 0, not NaN. No mask entries: 0.
    """
    z = logits.astype(work_dtype(logits.dtype))
    logp = jax.nn.log_softmax(z, axis=-1)
    # p * logp with p = 0 at a -inf logit is 0; the where keeps NaN out of values and gradients
    safe = jnp.where(jnp.isfinite(logp), logp, 0.0)
    h = -jnp.sum(jnp.exp(logp) * safe, axis=-1)
    m = mask.astype(h.dtype)
    return jnp.sum(h * m) / jnp.maximum(jnp.sum(m), 1.0)


def _merge_leaf(base: jax.Array, tau: jax.Array, c: jax.Array) -> jax.Array:
    """`base + sum_t c[t] tau[t]` in at least float32, returned in `base`'s dtype; tau `[T, ...]`, c `[T]`."""
    dt = work_dtype(base.dtype)
    delta = weighted_sum(tau.astype(dt), c.astype(dt))  # the task-arithmetic sum the YAML merge runs
    return (base.astype(dt) + delta).astype(base.dtype)


def layerwise_merge(base: Any, taus: Any, coeffs: jax.Array, groups: Any) -> Any:
    """`base + sum_t coeffs[g, t] * taus[t]` leaf by leaf, `g` the leaf's group.

    base: pytree of arrays; taus: the same structure with `[T, ...]` leaves
    (task vectors stacked); coeffs `[G, T]`; groups: the same structure with a
    Python int in `[0, G)` per leaf (static). Each leaf keeps `base`'s dtype.
    """
    return jax.tree.map(lambda b, t, g: _merge_leaf(b, t, coeffs[g]), base, taus, groups)


def _next_batch(batches: Any, key: jax.Array, step: jax.Array) -> Any:
    """Batch of step `step`: a seeded permutation of the `N` batches per epoch (each seen once per epoch)."""
    n = jax.tree.leaves(batches)[0].shape[0]
    order = jax.random.permutation(jax.random.fold_in(key, step // n), n)
    i = order[step % n]
    return jax.tree.map(lambda x: x[i], batches)


def learn_coefficients(
    loss_fn: LossFn,
    base: Any,
    taus: Any,
    batches: Any,
    *,
    num_groups: int,
    steps: int,
    learning_rate: float | jax.Array = 1e-3,
    init: float | jax.Array = 0.3,
    seed: int | jax.Array = 0,
    clip: tuple[float, float] | None = (0.0, 1.0),
    optimizer: optax.GradientTransformation | None = None,
    callback: StepCallback | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Minimise `loss_fn` over merge coefficients by gradient descent; returns `(coeffs [G,T], losses [steps])`.

    loss_fn: `(coeffs [G,T], base, taus, batch) -> scalar` (e.g. `entropy_loss`);
    differentiated wrt `coeffs` only. batches: pytree whose leaves have a leading
    axis of `N` batches; each step takes one, in a seeded order (a permutation of
    the `N` per epoch), so the result is a function of `seed`. init: scalar or
    `[G,T]` starting coefficients (AdaMerging's 0.3). clip: `(lo, hi)` projection
    after each step (module doc), or None. optimizer: default
    `optax.adam(learning_rate)`. `losses[k]` is the loss at step `k`'s
    coefficients (before its update). Runs as one `lax.scan`; jit-able (`loss_fn`,
    `steps`, `clip`, `optimizer` and `callback` are static) and usable inside a caller's jit.
    callback: `callback(step, loss)` after each step, through `jax.debug.callback`
    (one compiled scan still, as the device runs, so a progress bar shows real
    progress; it only observes: the values are those without it). Unordered:
    call `jax.effects_barrier()` before relying on every call having run.
    """
    if not 1 <= steps <= MAX_LEARNING_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_LEARNING_STEPS}], got {steps}")
    if clip is not None and not clip[0] <= clip[1]:
        raise ValueError(f"clip must be (lo, hi) with lo <= hi, got {clip}")
    tasks = jax.tree.leaves(taus)[0].shape[0]
    start = jnp.broadcast_to(jnp.asarray(init, jnp.float32), (num_groups, tasks))
    key = jax.random.PRNGKey(seed) if isinstance(seed, (int, np.integer)) else seed
    return _learn(
        loss_fn,
        base,
        taus,
        batches,
        start,
        jnp.asarray(learning_rate, jnp.float32),
        key,
        steps=steps,
        clip=None if clip is None else (float(clip[0]), float(clip[1])),
        optimizer=optimizer,
        callback=callback,
    )


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("steps", "clip", "optimizer", "callback"))
def _learn(
    loss_fn: LossFn,
    base: Any,
    taus: Any,
    batches: Any,
    start: jax.Array,
    learning_rate: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    clip: tuple[float, float] | None,
    optimizer: optax.GradientTransformation | None,
    callback: StepCallback | None = None,
) -> tuple[jax.Array, jax.Array]:
    opt = optimizer if optimizer is not None else optax.adam(learning_rate)
    grad_fn = jax.value_and_grad(loss_fn)

    def step(carry, k):
        coeffs, opt_state = carry
        loss, g = grad_fn(coeffs, base, taus, _next_batch(batches, key, k))
        updates, opt_state = opt.update(g, opt_state, coeffs)
        coeffs = optax.apply_updates(coeffs, updates)
        if clip is not None:
            coeffs = jnp.clip(coeffs, clip[0], clip[1])
        if callback is not None:
            jax.debug.callback(callback, k, loss)
        return (coeffs, opt_state), loss

    (coeffs, _), losses = jax.lax.scan(step, (start, opt.init(start)), jnp.arange(steps))
    return coeffs, losses


# ---------------------------------------------------------------------------
# Flax family models (`sgtv_jax.models`): groups, task vectors, the merged forward.


def param_groups(state: nnx.State) -> Any:
    """Group of each leaf of a family model's state: block `i` -> `i`, the rest -> `L` (number of blocks).

    Same structure as `state`; `num_groups(state) = L + 1`.
    """
    outer = num_blocks(state)

    def group(path: tuple, _: Any) -> int:
        if getattr(path[0], "key", None) == BLOCKS:
            return int(path[1].key)
        return outer

    return jax.tree_util.tree_map_with_path(group, state)


def num_blocks(state: nnx.State) -> int:
    """How many blocks a family model's state has."""
    return len(state[BLOCKS]) if BLOCKS in state else 0


def stack_task_vectors(base: nnx.State, finetuned: Sequence[nnx.State]) -> nnx.State:
    """`[T, ...]` float32 task vectors `ft_t - base` of each leaf (same structure as `base`)."""
    f32 = jnp.float32
    return jax.tree.map(lambda b, *fs: jnp.stack([f.astype(f32) - b.astype(f32) for f in fs]), base, *finetuned)


def _outer(state: nnx.State) -> nnx.State:
    return nnx.State({k: v for k, v in state.items() if k != BLOCKS})


def merged_logits(
    graphdef: nnx.GraphDef,
    base: nnx.State,
    taus: nnx.State,
    coeffs: jax.Array,
    input_ids: jax.Array,
    mask: jax.Array | None = None,
    *,
    remat: bool = True,
) -> jax.Array:
    """Logits `[B,S,V]` of the model `graphdef` with parameters `layerwise_merge(base, taus, coeffs, param_groups(base))`.

    Runs the model's own pieces (`embed`, `block_kwargs`, each block, `head`).
    With `remat`, each block's merge and forward (and the head) run under
    `jax.checkpoint`: the backward pass recomputes them, so only each block's
    input is kept between passes, not its merged weights or activations.
    """
    groups = num_blocks(base)
    outer = jax.tree.map(lambda b, t: _merge_leaf(b, t, coeffs[groups]), _outer(base), _outer(taus))
    shell = nnx.merge(graphdef, nnx.State({**outer, BLOCKS: base[BLOCKS]}))
    b, s = input_ids.shape
    kw = shell.block_kwargs(mask, s, batch=b)
    x = shell.embed(input_ids)
    for i in range(groups):
        bdef = nnx.graphdef(shell.blocks[i])  # each block's own graphdef (gemma's layer types differ)

        def block(c, bstate, btaus, x, kw, bdef=bdef):
            merged = jax.tree.map(lambda p, t: _merge_leaf(p, t, c), bstate, btaus)
            return nnx.merge(bdef, merged)(x, **kw)

        x = (jax.checkpoint(block) if remat else block)(coeffs[i], base[BLOCKS][i], taus[BLOCKS][i], x, kw)
    return (jax.checkpoint(shell.head) if remat else shell.head)(x)


@dataclasses.dataclass(frozen=True)
class EntropyLoss:
    """`loss_fn(coeffs, base, taus, batch)` for `learn_coefficients`: `entropy` of `merged_logits`.

    batch: `{"input_ids": [B,S] int, "mask": [B,S]}` (1 = real token). Hashable
    (by graphdef and `remat`), so `learn_coefficients` compiles once per model
    and input shapes, however many times it is called.
    """

    graphdef: nnx.GraphDef
    remat: bool = True

    def __call__(self, coeffs: jax.Array, base: nnx.State, taus: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        ids, mask = batch["input_ids"], batch["mask"]
        return entropy(merged_logits(self.graphdef, base, taus, coeffs, ids, mask, remat=self.remat), mask)


def entropy_loss(graphdef: nnx.GraphDef, *, remat: bool = True) -> LossFn:
    """The `EntropyLoss` of model `graphdef` (see there)."""
    return EntropyLoss(graphdef, remat)


def _path_name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trim_task_vectors(
    taus: nnx.State, kind: str, densities: float | Sequence[float], *, seed: int = 0, **options: Any
) -> nnx.State:
    """Trim every leaf's `[T, ...]` stack as `merge_method: adamerging` with `trim: kind` plans it.

    Each leaf is one tensor of the plan interpreter (`call.interpret`, then
    `plan.trim_call`): its name is the dotted state path (e.g.
    `blocks.0.mlp.up_proj.kernel.value`), its PRNG key `keys.tensor_key(seed, name)`,
    and rescale / count resolve as for every other tensor (adamerging's rescale
    default is off). kind: one of `FLAX_TRIMS`; densities and `options["gamma"]`:
    one value, or one per task; options: `rescale`, `count`, `gamma`.
    """
    from sgtv_jax.merge.call import interpret  # noqa: PLC0415 (cycle: specs imports this module's per-tensor step)
    from sgtv_jax.merge.plan import TensorPlan, trim_call  # noqa: PLC0415 (as above)

    if kind not in FLAX_TRIMS:
        raise ValueError(
            f"trim {kind!r} is not applied here; one of {', '.join(FLAX_TRIMS)} (or trim the taus yourself)"
        )
    unknown = set(options) - {"rescale", "count", "gamma"}
    if unknown:
        raise TypeError(f"trim_task_vectors got unexpected options {sorted(unknown)}")
    tasks = jax.tree.leaves(taus)[0].shape[0]

    def per_task(v: float | Sequence[float]) -> tuple[float, ...]:
        return tuple(v) if isinstance(v, Sequence) else (v,) * tasks

    gamma = options.get("gamma")
    params: dict[str, Any] = {k: options[k] for k in ("rescale", "count") if k in options}

    def one(path: tuple, tau: jax.Array) -> jax.Array:
        name = _path_name(path)
        plan = TensorPlan(
            "adamerging",
            name,
            weights=(1.0,) * tasks,  # the trim reads no weights (they are learned after it)
            densities=per_task(densities),
            trim=kind,
            params=params,
            gamma=None if gamma is None else per_task(gamma),
            seed=seed,
        )
        return trim_call(interpret(plan, ndim=tau.ndim - 1), tau)[0]

    return jax.tree_util.tree_map_with_path(one, taus)


def calibration_batches(input_ids: np.ndarray, mask: np.ndarray, batch_size: int) -> dict[str, jax.Array]:
    """Windows `[N, S]` -> `{"input_ids", "mask"}` of shape `[ceil(N/b), b, S]`; the last batch padded with masked rows."""
    n, s = input_ids.shape
    nb = -(-n // batch_size)
    ids = np.zeros((nb * batch_size, s), np.int32)
    m = np.zeros((nb * batch_size, s), np.int32)
    ids[:n], m[:n] = input_ids, mask
    return {
        "input_ids": jnp.asarray(ids.reshape(nb, batch_size, s)),
        "mask": jnp.asarray(m.reshape(nb, batch_size, s)),
    }


Objective = Callable[[nnx.GraphDef, Sequence[nnx.State]], tuple[LossFn, Any]]
"""`objective(graphdef, finetuned states) -> (loss_fn, batches)`: what `learn_merge` minimises, on which batches."""


def learn_merge(
    base_model: nnx.Module,
    finetuned: Sequence[nnx.Module],
    objective: Objective,
    *,
    steps: int = 100,
    learning_rate: float = 1e-3,
    init: float = 0.3,
    seed: int = 0,
    clip: tuple[float, float] | None = (0.0, 1.0),
    trim: str | None = None,
    densities: float | Sequence[float] = 1.0,
    trim_options: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
) -> tuple[nnx.Module, jax.Array, jax.Array]:
    """Learn layer-wise coefficients of Flax family models for `objective`; returns `(merged model, coeffs [L+1,T], losses)`.

    trim / densities / trim_options: optional `trim_task_vectors` before learning
    (its PRNG seed is `seed`). Row `i < L` of the coefficients scales block `i`,
    row `L` everything outside the blocks. The merged model is a new model
    (the inputs are not modified). callback: `learn_coefficients`' (progress only).
    """
    graphdef, base = nnx.split(base_model)
    states = [nnx.state(m) for m in finetuned]
    loss_fn, batches = objective(graphdef, states)
    taus = stack_task_vectors(base, states)
    if trim is not None:
        taus = trim_task_vectors(taus, trim, densities, seed=seed, **(trim_options or {}))
    coeffs, losses = learn_coefficients(
        loss_fn,
        base,
        taus,
        batches,
        num_groups=num_blocks(base) + 1,
        steps=steps,
        learning_rate=learning_rate,
        init=init,
        seed=seed,
        clip=clip,
        callback=callback,
    )
    merged = nnx.merge(graphdef, layerwise_merge(base, taus, coeffs, param_groups(base)))
    return merged, coeffs, losses


def merge_with_learned_coefficients(
    base_model: nnx.Module,
    finetuned: Sequence[nnx.Module],
    input_ids: np.ndarray,
    mask: np.ndarray,
    *,
    batch_size: int = 8,
    remat: bool = True,
    **learning: Any,
) -> tuple[nnx.Module, jax.Array, jax.Array]:
    """AdaMerging (entropy) of Flax family models on calibration windows; returns `(merged model, coeffs [L+1,T], losses)`.

    input_ids / mask: `[N, S]` windows (`sgtv_jax.pipeline.calibration.CalibrationSet`),
    `batch_size` per step. learning: `learn_merge`'s keywords (steps,
    learning_rate, init, seed, clip, trim, densities, trim_options, callback).
    """

    def objective(graphdef: nnx.GraphDef, _: Sequence[nnx.State]) -> tuple[LossFn, Any]:
        return entropy_loss(graphdef, remat=remat), calibration_batches(input_ids, mask, batch_size)

    return learn_merge(base_model, finetuned, objective, **learning)


def weight_rules(coeffs: Any, block_prefix: Callable[[int], str]) -> list[list[dict[str, Any]]]:
    """Learned coefficients `[L+1, T]` as each model's per-tensor `weight` spec (`sgtv_jax.merge.paramspec` rules).

    Model `t`'s spec is `[{filter: block_prefix(i), value: coeffs[i, t]} for each block i] + [{value: coeffs[L, t]}]`
    (HF names: `block_prefix` is the family's `hf_block_prefix`, e.g. `model.layers.{i}.`, dot-terminated so
    block 1 never matches block 11). With `merge_method: task_arithmetic` (and the same trim and densities)
    a YAML merge then reproduces `layerwise_merge` with these coefficients tensor by tensor.
    """
    c = np.asarray(coeffs, np.float64)
    blocks = c.shape[0] - 1
    return [
        [{"filter": block_prefix(i), "value": float(c[i, t])} for i in range(blocks)] + [{"value": float(c[blocks, t])}]
        for t in range(c.shape[1])
    ]


def adamerging(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    steps: int = 100,
    learning_rate: float = 1e-3,
    init: float = 0.3,
    clip: bool = True,
    rescale: bool | None = None,
    count: str = "round",
    trim: str | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = trim_lib.GAMMA,
    epsilon: Floats = trim_lib.EPSILON,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    refit: bool = False,
    name: str | None = None,
    objective: str = "entropy",
) -> jax.Array:
    """AdaMerging's per-tensor step: `sum_t w_t trim(tau_t)`, `weights` the learned coefficients of this tensor.

    deltas `[T, ...]` -> merged task vector `[...]` (`task_arithmetic` with
    lambda 1, no normalisation). The coefficients are learned over whole models
    (`merge_with_learned_coefficients`; `sgtv merge` does it before merging),
    which a single tensor cannot do: `steps`, `learning_rate`, `init`, `clip`
    and `objective` configure that learning pass and are ignored here (they are this
    function's keywords so that the method's parameters and its signature
    agree, its row in `specs.METHOD_SPECS`).
    """
    del steps, learning_rate, init, clip, objective  # the learning pass's, not the tensor's
    return generalized_task_arithmetic(
        deltas,
        weights,
        densities,
        rescale=resolve_rescale(rescale, False, trim),
        count=count,
        trim=trim,
        key=key,
        calib=calib,
        gamma=gamma,
        epsilon=epsilon,
        blocksize=blocksize,
        percdamp=percdamp,
        refit=refit,
        name=name,
    )
