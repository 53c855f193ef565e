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

import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.errors import short_repr
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.keys import tensor_key
from sgtv_jax.merge.methods import resolve_rescale
from sgtv_jax.merge.registry import get_method
from sgtv_jax.merge.specs import MethodSpec, method_spec
from sgtv_jax.obs import obs_prune, obs_prune_from_inverse


class PlanError(ValueError):
    """A plan the method cannot run (e.g. density < 1 for a method that does not trim)."""


class ObsOptions(NamedTuple):
    """Options of the OBS (SparseGPT) trim.

    blocksize: columns per OBS block; percdamp: relative damping of H (raised
    x10 while H is indefinite); prunen / prunem: N:M semi-structured pruning
    (e.g. 2:4) instead of the densities when prunem > 0; refit: re-solve the
    kept entries by least squares for the final mask.
    """

    blocksize: int = BLOCKSIZE
    percdamp: float = PERCDAMP
    prunen: int = 0
    prunem: int = 0
    refit: bool = False

    def problems(self) -> list[str]:
        """Every reason these options cannot run (empty: none), each naming the option."""
        out = []
        b, p, n, m = self.blocksize, self.percdamp, self.prunen, self.prunem
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            out.append(f"blocksize must be an integer >= 1, got {short_repr(b)}")
            b = 0
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < math.inf:
            out.append(f"percdamp must be a finite number >= 0, got {short_repr(p)}")
        if not isinstance(self.refit, bool):
            out.append(f"refit must be true or false, got {short_repr(self.refit)}")
        for label, v in (("prunen", n), ("prunem", m)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                out.append(f"{label} must be an integer >= 0, got {short_repr(v)}")
                return out
        if (n == 0) != (m == 0):
            out.append(f"prunen and prunem go together (N:M pruning), got prunen={n}, prunem={m}")
        elif m and not (0 < n < m):
            out.append(f"prunen must be in (0, prunem), got {n}:{m}")
        elif m and b and b % m:
            out.append(f"blocksize {b} must be a multiple of prunem {m}")
        return out


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
    """Trim then merge `deltas` `[T, ...]` as `plan` says.

    `calib`: the tensor's calibration statistics (`Calibration`: a Hessian
    `[in, in]` or `[T, in, in]`, or a full inverse Hessian, or input norms
    `[in]` / `[T, in]`), needed by `sparsegpt` / `wanda` trims and RegMean.
    `base`: the base tensor `theta_0` (same layout as one task vector), needed
    by methods on whole weights (`MethodSpec.needs_base`: slerp, karcher,
    arcee_fusion, passthrough with a scale, linear with normalize false).
    Returns (merged task vector `[...]`, trimmed stack `[T, ...]` (the input
    for methods that do not trim), `MergeInfo`).
    """
    spec = method_spec(plan.method)
    if not spec.trims:
        return _merge_untrimmed(plan, spec, deltas, calib, base), deltas, MergeInfo(None, None)
    kind = plan.trim if plan.trim is not None else spec.default_trim
    kw = dict(plan.params or {})
    # The method's own rule: random default trims rescale by 1/density, calibration trims don't.
    rescale = resolve_rescale(kw.pop("rescale", None), spec.rescale_default, kind)
    count = kw.pop("count", "round")  # how many entries a top-k trim keeps: it belongs to the trim
    key = plan.key
    damping = None
    hessian = calib.hessian if calib is not None and deltas.ndim == 3 else None
    if spec.needs_grams and hessian is not None:  # Hessian fits: the calibration Hessian is their Grams
        kw["grams"] = hessian
    if spec.trims_merged:
        return _merge_then_trim(plan, deltas, kind, rescale, count, kw), deltas, MergeInfo(kind, None)
    if kind is None:
        if any(d != 1.0 for d in plan.densities):
            raise PlanError(
                f"density {list(plan.densities)} < 1 for tensor {plan.name!r} but method "
                f"{plan.method!r} does not trim by itself: set trim (e.g. magnitude or sparsegpt)"
            )
        trimmed = deltas
    elif kind == "sparsegpt":
        trimmed, damping = _obs_trim(plan, deltas, calib, rescale)
    else:
        extra: dict[str, Any] = {}
        if plan.gamma is not None:
            extra["gamma"] = list(plan.gamma)
        if plan.epsilon is not None:
            extra["epsilon"] = list(plan.epsilon)
        trimmed = trim_lib.trim(
            kind,
            deltas,
            list(plan.densities),
            key=key,
            calib=calib,
            rescale=rescale,
            blocksize=plan.obs.blocksize,
            percdamp=plan.obs.percdamp,
            name=plan.name,
            count=count,
            **extra,
        )
    if spec.needs_targets:
        kw["targets"] = deltas  # lstsq fits the untrimmed task vectors with the trimmed ones
    merged = get_method(plan.method)(
        trimmed, list(plan.weights), 1.0, trim=None, rescale=False, name=plan.name, key=key, **kw
    )
    return merged, trimmed, MergeInfo(kind, damping)


def _merge_then_trim(
    plan: TensorPlan, deltas: jax.Array, kind: str | None, rescale: bool, count: str, kw: dict[str, Any]
) -> jax.Array:
    """Methods whose trim applies to the merged task vector (`spec.trims_merged`): one call with the trim."""
    o = plan.obs
    if o.prunem:
        raise PlanError(f"{plan.method} trims the merged task vector: N:M (prunen/prunem) is not supported for it")
    if kind is None and any(d != 1.0 for d in plan.densities):
        raise PlanError(f"density {list(plan.densities)} < 1 for tensor {plan.name!r} but no trim is set")
    extra: dict[str, Any] = {}
    if plan.gamma is not None:
        extra["gamma"] = list(plan.gamma)
    if plan.epsilon is not None:
        extra["epsilon"] = list(plan.epsilon)
    return get_method(plan.method)(
        deltas,
        list(plan.weights),
        list(plan.densities),
        trim=kind,
        rescale=rescale,
        count=count,
        key=plan.key,
        blocksize=o.blocksize,
        percdamp=o.percdamp,
        refit=o.refit,
        name=plan.name,
        **extra,
        **kw,
    )


def _obs_trim(
    plan: TensorPlan, deltas: jax.Array, calib: trim_lib.Calibration | None, rescale: bool
) -> tuple[jax.Array, float | None]:
    """SparseGPT trim with the plan's OBS options; returns (trimmed, damping used: None from an inverse)."""
    o = plan.obs
    nm = dict(prunen=o.prunen, prunem=o.prunem) if o.prunem else dict(density=list(plan.densities))
    if calib is not None and calib.hessian is not None:
        trimmed, info = obs_prune(
            deltas,
            calib.hessian,
            blocksize=o.blocksize,
            percdamp=o.percdamp,
            refit=o.refit,
            name=plan.name,
            return_info=True,
            **nm,
        )
        damping = float(jnp.max(info.percdamp))
    elif calib is not None and calib.hessian_inv is not None:
        if o.refit:
            raise PlanError(f"refit needs the Hessian itself, not its inverse, for tensor {plan.name!r}")
        trimmed, _ = obs_prune_from_inverse(deltas, calib.hessian_inv, blocksize=o.blocksize, name=plan.name, **nm)
        damping = None
    else:
        raise PlanError(trim_lib.missing_stats_message("sparsegpt", plan.name))
    if rescale:
        trimmed = trim_lib.inverse_density_scale(trimmed, list(plan.densities))
    return trimmed, damping


def _merge_untrimmed(
    plan: TensorPlan, spec: MethodSpec, deltas: jax.Array, calib: trim_lib.Calibration | None, base: jax.Array | None
) -> jax.Array:
    """Methods without a trim step (linear, regmean) on the raw task vectors."""
    kw = dict(plan.params or {})
    kw.pop("rescale", None)
    if spec.needs_grams and calib is not None and calib.hessian is not None and deltas.ndim == 3:
        kw["grams"] = calib.hessian
    if spec.needs_base:
        if base is None and plan.method == "linear" and kw.get("normalize", spec.normalize_default) is False:
            raise PlanError(
                f"{plan.method} with normalize=false sums whole models and needs the base tensor "
                f"of {plan.name!r} (merge_planned(..., base=theta_0))"
            )
        if base is not None:
            kw["base"] = base
    return get_method(plan.method)(deltas, list(plan.weights), name=plan.name, **kw)
