"""One tensor's merge as data: a `TensorPlan`, and `merge_planned`, the one function that runs it.

A plan holds everything that decides how one tensor's stack of task vectors
`deltas` `[T, ...]` is merged: the method (a name in `specs.METHOD_SPECS`), the
trim (None: the method's own), per-task densities and weights (and breadcrumbs'
`gamma` / magprune's `epsilon`), the method's parameters, the OBS options and
the PRNG seed. `merge_planned` reads what the method does from the spec table, not
from its signature:

    methods that trim (spec.trims):
        trim = plan.trim or spec.default_trim
        sparsegpt -> sgtv_jax.obs.obs_prune (N:M when obs.prunem, else the densities;
                     refit when obs.refit), or obs_prune_from_inverse given only an
                     inverse Hessian; then 1/density only if rescale is asked
        any other -> sgtv_jax.merge.trim.trim (rescale: the method's rule; wanda
                     reads the input norms, or derives them from the Hessian)
        then the method without trimming (sign election on the trimmed vectors)
        Hessian fits (spec.needs_grams) get the Hessian as `grams`; lstsq
        (spec.needs_targets) also gets the untrimmed stack as `targets`;
        regmean_sparse (spec.trims_merged) is called once on the untrimmed
        stack with the trim, which it applies to the merged task vector
    methods that do not (linear, regmean): the method on the raw task vectors
        (RegMean's Grams are the calibration Hessian of a 2-D tensor; linear
        without normalize sums whole models and reads the base tensor)

2-D task vectors are `[out, in]` (PyTorch layout), like the Hessians `[in, in]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.call import MergeCall, ObsOptions, PlanError, interpret
from sgtv_jax.merge.keys import tensor_key
from sgtv_jax.merge.registry import get_method
from sgtv_jax.merge.specs import method_spec


class TensorPlan(NamedTuple):
    """How to merge one tensor.

    method: merge method name; name: the tensor's name (PRNG key, messages);
    weights, densities: one per task `[T]`; trim: a trim of `trim.TRIMS` or
    None for the method's default; params: the method's keywords
    (`normalize`, `lambda_`, `consensus`, `rescale`, `alpha`, ...);
    gamma, epsilon: per task, or None for the trims' defaults; obs: options of
    a `sparsegpt` trim; seed: int seed or PRNG key, folded with `name`.
    """

    method: str
    name: str
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    trim: str | None = None
    params: Mapping[str, Any] | None = None
    gamma: tuple[float, ...] | None = None
    epsilon: tuple[float, ...] | None = None
    obs: ObsOptions = ObsOptions()
    seed: int | jax.Array = 0

    @property
    def key(self) -> jax.Array:
        """This tensor's PRNG key (`keys.tensor_key(seed, name)`)."""
        return tensor_key(self.seed, self.name)


class MergeInfo(NamedTuple):
    """What `merge_planned` did: the trim applied (None: none) and the damping OBS used (None: no OBS)."""

    trim: str | None
    damping: float | None


def maps_zero_to_zero(method: str) -> bool:
    """Whether all-zero task vectors merge to a zero change (then the base tensor is the result).

    True for methods on task vectors; not for methods on whole weights
    (`MethodSpec.needs_base`: passthrough with a scale changes an untouched tensor).
    """
    return not method_spec(method).needs_base


def merge_planned(
    plan: TensorPlan,
    deltas: jax.Array,
    calib: trim_lib.Calibration | None = None,
    base: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, MergeInfo]:
    """Trim then merge `deltas` `[T, ...]` as `plan` says: `call.interpret`, then `run_call` on the whole tensor.

    `calib`: the tensor's calibration statistics (`Calibration`: a Hessian
    `[in, in]` or `[T, in, in]`, or a full inverse Hessian, or input norms
    `[in]` / `[T, in]`), needed by `sparsegpt` / `wanda` trims and RegMean.
    `base`: the base tensor `theta_0` (same layout as one task vector), needed
    by methods on whole weights (`MethodSpec.needs_base`: slerp, karcher,
    arcee_fusion, passthrough with a scale, linear with normalize false).
    Returns (merged task vector `[...]`, trimmed stack `[T, ...]` (the input
    for methods that do not trim), `MergeInfo`).
    """
    call = interpret(plan, ndim=deltas.ndim - 1, calib=calib)
    return run_call(call, deltas, calib, base)


def run_call(
    call: MergeCall,
    deltas: jax.Array,
    calib: trim_lib.Calibration | None = None,
    base: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, MergeInfo]:
    """Execute `call` on the whole stack `deltas` `[T, ...]` (see `merge_planned`)."""
    if call.stage == "merge_then_trim":  # one call: the method trims the merged task vector
        merged = run_whole(call, deltas, list(call.weights), list(call.densities), calib)
        return merged, deltas, MergeInfo(call.trim, None)
    kw = _method_kwargs(call, calib)
    if call.stage == "untrimmed":
        return _merge_untrimmed(call, deltas, base, kw), deltas, MergeInfo(None, None)
    trimmed, damping = trim_call(call, deltas, calib)
    if call.targets:
        kw["targets"] = deltas  # lstsq fits the untrimmed task vectors with the trimmed ones
    merged = get_method(call.method)(
        trimmed, list(call.weights), 1.0, trim=None, rescale=False, name=call.name, key=call.key, **kw
    )
    return merged, trimmed, MergeInfo(call.trim, damping)


def run_whole(
    call: MergeCall,
    deltas: jax.Array,
    weights: Any,
    densities: Any = None,
    calib: trim_lib.Calibration | None = None,
) -> jax.Array:
    """`call` as one call of its method on `deltas` `[T, ...]`, the trim (if any) applied by the method itself.

    The executor of `merge_then_trim` calls and of `batch.merge_grid`, which
    keeps no trimmed stack: `weights` / `densities` `[T]` may be traced (the
    grid's axes; densities None: the method's own). Methods without a trim
    step get the Grams alone; methods that trim also get `calib`.
    """
    kw = _method_kwargs(call, calib)
    if call.stage == "untrimmed":
        return get_method(call.method)(deltas, weights, name=call.name, **kw)
    if densities is not None:
        kw["densities"] = densities
    if calib is not None:
        kw["calib"] = calib
    return get_method(call.method)(deltas, weights, trim=call.trim, refit=call.obs.refit, **call.trim_kwargs(), **kw)


def _method_kwargs(call: MergeCall, calib: trim_lib.Calibration | None) -> dict[str, Any]:
    """The method's keywords; Hessian fits and RegMean also get the calibration Hessian as their Grams."""
    kw = call.method_kwargs()
    if call.grams:
        kw["grams"] = calib.hessian  # type: ignore[union-attr]  # call.grams: a Hessian is there
    return kw


def trim_call(
    call: MergeCall, deltas: jax.Array, calib: trim_lib.Calibration | None = None
) -> tuple[jax.Array, float | None]:
    """The trim step of `call` on the whole stack `deltas` `[T, ...]`: (trimmed `[T, ...]`, OBS damping or None).

    No trim (`call.trim` None): `deltas` as they are. Used by `run_call` and by
    AdaMerging's trim of whole Flax models (`adamerging.trim_task_vectors`).
    """
    if call.trim is None:
        return deltas, None
    if call.trim != "sparsegpt":
        return trim_lib.trim(call.trim, deltas, list(call.densities), calib=calib, **call.trim_kwargs()), None
    o = call.obs
    if calib is None or (calib.hessian is None and calib.hessian_inv is None):
        raise PlanError(trim_lib.missing_stats_message("sparsegpt", call.name))
    if o.refit and calib.hessian is None:
        raise PlanError(f"refit needs the Hessian itself, not its inverse, for tensor {call.name!r}")
    return trim_lib.sparsegpt_info(
        deltas,
        list(call.densities),
        calib,
        blocksize=o.blocksize,
        percdamp=o.percdamp,
        refit=o.refit,
        rescale=call.rescale,
        name=call.name,
        prunen=o.prunen,
        prunem=o.prunem,
    )


def _merge_untrimmed(call: MergeCall, deltas: jax.Array, base: jax.Array | None, kw: dict[str, Any]) -> jax.Array:
    """Methods without a trim step (linear, regmean) on the raw task vectors."""
    if call.base:
        if base is None and call.method == "linear" and kw.get("normalize", call.spec.normalize_default) is False:
            raise PlanError(
                f"{call.method} with normalize=false sums whole models and needs the base tensor "
                f"of {call.name!r} (merge_planned(..., base=theta_0))"
            )
        if base is not None:
            kw["base"] = base
    return get_method(call.method)(deltas, list(call.weights), name=call.name, **kw)
