"""The plan interpreter: one tensor's `TensorPlan` turned into one concrete `MergeCall`.

Planner -> interpreter -> executors (docs/architecture.md): the planner
(`sgtv_jax.pipeline`) writes a `plan.TensorPlan` per tensor; `interpret` reads
the method's spec row once and resolves everything the plan leaves implicit
(which trim, whether it rescales, the count rule, per-model gamma / epsilon,
the PRNG key, the method's own keywords, which statistics the method gets);
the executors run that call as it is: `plan.merge_planned` on the whole
tensor, `streaming.merge_rows` row chunk by row chunk, and AdaMerging's trim
of whole Flax models (`adamerging.trim_task_vectors`, through
`plan.trim_call`). No executor reads the plan's params or the trims' defaults
again.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal, NamedTuple

import jax

from sgtv_jax._checks import where
from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.errors import short_repr
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.methods import resolve_rescale
from sgtv_jax.merge.specs import MethodSpec, method_spec

Stage = Literal["untrimmed", "trim_then_merge", "merge_then_trim"]
"""How the trim and the method compose: no trim step (linear, regmean); the trim on
each task vector, then the method without its own trim (sign election sees the
trimmed vectors); or the method called once with the trim, which it applies to
the merged task vector (`MethodSpec.trims_merged`)."""


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


class PlanError(ValueError):
    """A plan the method cannot run (e.g. density < 1 for a method that does not trim)."""


@dataclasses.dataclass(frozen=True)
class MergeCall:
    """One tensor's merge, resolved: what every executor runs as it is.

    stage: see `Stage`; trim: the trim applied (None: none); rescale: 1/density
    after the trim; count: "round" / "floor" entry counts of top-k trims;
    gamma / epsilon: breadcrumbs' / magprune's per-model values (a shared
    scalar: the trims' default); key: the tensor's PRNG key; obs: the
    SparseGPT trim's options (blocksize, damping, N:M, refit); kwargs: the
    method's keywords, frozen (lists as tuples; no rescale / count, which are
    the trim's); grams / targets / base: pass the calibration Hessian as the
    method's Grams, the untrimmed stack as lstsq's targets, the base tensor.
    """

    method: str
    name: str
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    stage: Stage
    trim: str | None
    rescale: bool
    count: str
    gamma: float | tuple[float, ...] | jax.Array  # the grid's gamma / epsilon: traced scalars
    epsilon: float | tuple[float, ...] | jax.Array
    key: jax.Array  # the grid may leave it None: the methods' default
    obs: ObsOptions
    kwargs: tuple[tuple[str, Any], ...]
    grams: bool
    targets: bool
    base: bool

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.method)

    def method_kwargs(self) -> dict[str, Any]:
        """The method's keywords as the method takes them (tuples back to lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs}

    def trim_kwargs(self) -> dict[str, Any]:
        """The trim's keywords as `trim_lib.trim` takes them (key, OBS block and damping, gamma / epsilon, ...)."""
        obs = dict(blocksize=self.obs.blocksize, percdamp=self.obs.percdamp)
        per_task = dict(gamma=self.gamma, epsilon=self.epsilon)
        return dict(key=self.key, name=self.name) | obs | per_task | dict(rescale=self.rescale, count=self.count)


def frozen(kw: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """`kw` as a hashable, ordered key (lists as tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))


def trim_kind(plan: Any, spec: MethodSpec) -> str | None:
    """The trim `plan` applies: its own, else the method's default; None for methods without a trim step."""
    if not spec.trims:
        return None
    return plan.trim if plan.trim is not None else spec.default_trim


def interpret(plan: Any, *, ndim: int, calib: trim_lib.Calibration | None = None) -> MergeCall:
    """The `MergeCall` of `plan` (a `plan.TensorPlan`) for task vectors of `ndim` dims per task.

    `calib`: the tensor's statistics (a 2-D tensor's Hessian becomes the
    Grams of RegMean and the Hessian fits). Raises PlanError for what the plan
    cannot run: densities < 1 without a trim, an unknown count rule, N:M on a
    method that trims the merged task vector.
    """
    spec = method_spec(plan.method)
    kind = trim_kind(plan, spec)
    kw = dict(plan.params or {})
    rescale_opt = kw.pop("rescale", None)
    count = kw.pop("count", "round") if spec.trims else "round"  # how many a top-k trim keeps: the trim's
    if spec.trims and count not in trim_lib.COUNTS:
        raise PlanError(f"unknown count rule {count!r}{where(plan.name)}; known: {', '.join(trim_lib.COUNTS)}")
    # The method's own rule: random default trims rescale by 1/density, calibration trims don't.
    rescale = resolve_rescale(rescale_opt, spec.rescale_default, kind) if spec.trims else False
    stage: Stage = "untrimmed" if not spec.trims else "merge_then_trim" if spec.trims_merged else "trim_then_merge"
    if stage == "merge_then_trim" and plan.obs.prunem:
        raise PlanError(f"{plan.method} trims the merged task vector: N:M (prunen/prunem) is not supported for it")
    if spec.trims and kind is None and any(d != 1.0 for d in plan.densities):
        raise PlanError(
            f"density {list(plan.densities)} < 1 for tensor {plan.name!r} but method "
            f"{plan.method!r} does not trim by itself: set trim (e.g. magnitude or sparsegpt)"
        )
    has_hessian = calib is not None and calib.hessian is not None and ndim == 2
    return MergeCall(
        method=plan.method,
        name=plan.name,
        weights=tuple(plan.weights),
        densities=tuple(plan.densities),
        stage=stage,
        trim=kind,
        rescale=rescale,
        count=count,
        gamma=trim_lib.GAMMA if plan.gamma is None else tuple(plan.gamma),
        epsilon=trim_lib.EPSILON if plan.epsilon is None else tuple(plan.epsilon),
        key=plan.key,
        obs=plan.obs,
        kwargs=frozen(kw),
        grams=spec.needs_grams and has_hessian,
        targets=spec.needs_targets and stage == "trim_then_merge",
        base=spec.needs_base,
    )
