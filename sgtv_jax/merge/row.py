"""What one merge-method row is, and how a row is made from its function (`method_row`).

A row (`MethodSpec`) is the one declaration of a merge method: its function,
its config parameters (`ParamSpec`: type, range, doc) and its needs. What the
function's signature already says is read from it, never restated: every
parameter's default (a signature without one makes the parameter required),
whether the method trims (`trim` keyword) and its default trim, its sign
election (`consensus`), its `normalize` default, and whether it reads Grams,
targets or the base weights. `method_row` refuses, at import, a row whose
parameters and the function's keywords differ, so config validation, `sgtv
methods`, the generated reference and the Python call cannot disagree.

Parameter kinds: "bool" (YAML `true` / `false` only, never a quoted string),
"float" (a finite real; `.nan` / `.inf` refused), "int", "choice" (one of
`choices`). A default of None means "the method's own rule" (e.g. `rescale`:
`MethodSpec.rescale_default`, off for calibration trims).

Function convention (every method): `f(deltas [T, ...], weights [T], *,
<parameters>, name=...) -> [...]`, the merged *task vector* (the merged tensor
is `theta_0 + result`); `deltas[t] = theta_t - theta_0` in config order, 2-D
tensors in PyTorch `[out, in]` layout. Methods that trim also take `TRIM_ARGS`
(`densities` third positional); methods that read the base take `base=theta_0`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

KINDS = ("bool", "float", "int", "choice")


class _FromSignature:
    """Marker: a `ParamSpec.default` still to be read from the method function's signature."""

    def __repr__(self) -> str:
        return "FROM_SIGNATURE"


FROM_SIGNATURE: Any = _FromSignature()

# The method functions' keywords that callers fill in (task vectors, per-model values, the
# PRNG key, calibration, the trim and its OBS options): never `parameters` of a config.
COMMON_ARGS = ("deltas", "weights", "name")
TRIM_ARGS = ("densities", "key", "calib", "gamma", "epsilon", "trim", "blocksize", "percdamp", "refit")


class ParamSpec(NamedTuple):
    """One parameter: `name` as written in a config (`lambda`, not `lambda_`).

    `default`: left out in a method row, where `method_row` reads it from the
    function's signature (no default there: `required`). `lo` / `hi`: inclusive
    bounds for numbers (None: unbounded), `lo` exclusive when `lo_open` (a step
    size "> 0"); iteration counts always have a finite `hi`, so no config can ask
    for an endless loop. `choices`: the allowed values of a "choice"; `arg`: the
    keyword of the method function. Config validation (`sgtv check`, `sgtv
    merge`) and the Python API's `sgtv_jax.merge.merge` enforce these ranges.
    """

    name: str
    kind: str
    default: Any = FROM_SIGNATURE
    lo: float | None = None
    hi: float | None = None
    doc: str = ""
    choices: tuple[Any, ...] = ()
    arg: str = ""
    required: bool = False
    lo_open: bool = False

    @property
    def keyword(self) -> str:
        """The method function's keyword for this parameter."""
        return self.arg or self.name


class MethodSpec(NamedTuple):
    """A merge method: its function `fn`, its behaviour and its `parameters`.

    trims: the method has a trim step (then `trim` may replace `default_trim`,
    None meaning no trimming unless asked); consensus: its sign election
    ("sum") or None; needs_grams: it reads calibration Gram matrices (RegMean);
    needs_base: it needs the base weights for some setting (linear without
    normalize sums whole models); base_optional: a config may leave out
    `base_model` (mergekit's linear needs none): the first model is the base then,
    which leaves the result unchanged; min_models / max_models: how many
    fine-tuned models (besides the base) it merges; needs_targets: it fits the
    untrimmed task vectors (`targets`) with its trimmed ones (lstsq); trims_merged:
    the trim applies to the merged task vector, not to each input (regmean_sparse);
    entrywise: after its trim the method combines each entry on its own (no
    whole-tensor statistic), so a tensor can be merged in row chunks
    (`streaming.merge_rows`; RegMean qualifies for the tensors without Grams
    that reach it there: their weighted mean); learns_weights: the models'
    weights are learned from calibration data over whole models before the
    merge (adamerging), so a config gives none and must give `calibration`.
    base_point: the base model is one of the merged points, as mergekit gathers
    it with the others (karcher): a `base_model` not listed in `models` joins
    them with weight 1 (`pipeline.base_rules`). stored_layout: the result
    depends on the tensor's axes (a softmax or a norm per row), so 2-D tensors
    are merged in their stored Hugging Face layout, the one mergekit reads,
    never in the transposed view the pipeline uses for embeddings.
    """

    name: str
    params: tuple[ParamSpec, ...]
    trims: bool
    default_trim: str | None
    consensus: str | None
    normalize_default: bool | None
    rescale_default: bool
    needs_grams: bool = False
    needs_base: bool = False
    base_optional: bool = False
    doc: str = ""
    min_models: int = 1
    max_models: int | None = None
    needs_targets: bool = False
    trims_merged: bool = False
    entrywise: bool = False
    learns_weights: bool = False
    base_point: bool = False
    stored_layout: bool = False
    fn: Callable[..., Any] | None = None

    def param(self, name: str) -> ParamSpec | None:
        """The parameter called `name` in a config, or None."""
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


def call_args(spec: MethodSpec) -> tuple[str, ...]:
    """The keywords of `spec`'s method function besides its `params`, from what the method does."""
    return (
        COMMON_ARGS
        + (TRIM_ARGS if spec.trims else ())
        + (("grams",) if spec.needs_grams else ())
        + (("targets",) if spec.needs_targets else ())
        + (("base",) if spec.needs_base else ())
    )


def _with_default(ps: ParamSpec, sig: inspect.Signature, name: str) -> ParamSpec:
    """`ps` with its default from the signature (none there: required)."""
    if ps.keyword not in sig.parameters:
        raise TypeError(f"method row {name!r}: parameter {ps.name!r} is not a keyword of its function")
    if ps.default is not FROM_SIGNATURE:
        raise TypeError(f"method row {name!r}: {ps.name!r} restates a default; the function's signature holds it")
    if ps.kind not in KINDS:
        raise TypeError(f"method row {name!r}: {ps.name!r} has kind {ps.kind!r}, not one of {KINDS}")
    default = sig.parameters[ps.keyword].default
    if default is inspect.Parameter.empty or ps.required:
        # `required` in the row: the function's None default is its "not given" error
        return ps._replace(default=None, required=True)
    out_of_range = default is not None and (
        (ps.kind == "choice" and default not in ps.choices)
        or (ps.lo is not None and default < ps.lo)
        or (ps.hi is not None and default > ps.hi)
    )
    if out_of_range:
        raise TypeError(f"method row {name!r}: {ps.name!r}'s default {default!r} is outside what the row allows")
    return ps._replace(default=default)


def method_row(
    fn: Callable[..., Any], name: str, params: tuple[ParamSpec, ...], doc: str, **behaviour: Any
) -> MethodSpec:
    """The row of method `name` computed by `fn`: what the signature says is read from it.

    `behaviour`: the `MethodSpec` fields a signature cannot show (`rescale_default`,
    `base_optional`, `min_models`, `max_models`, `trims_merged`, `entrywise`,
    `learns_weights`, `base_point`, `stored_layout`). TypeError (at import) when `params` plus the caller-filled
    keywords (`call_args`) are not exactly `fn`'s keywords.
    """
    sig = inspect.signature(fn)
    keys = sig.parameters

    def default(kw: str) -> Any:
        return keys[kw].default if kw in keys else None

    spec = MethodSpec(
        name,
        tuple(_with_default(ps, sig, name) for ps in params),
        trims="trim" in keys,
        default_trim=default("trim"),
        consensus=default("consensus"),
        normalize_default=default("normalize"),
        rescale_default=behaviour.pop("rescale_default", False),
        needs_grams="grams" in keys,
        needs_targets="targets" in keys,
        needs_base="base" in keys,
        doc=doc,
        fn=fn,
        **behaviour,
    )
    declared = {ps.keyword for ps in spec.params}
    expected = set(call_args(spec)) | declared
    if set(keys) != expected or set(call_args(spec)) & declared:
        raise TypeError(
            f"method row {name!r}: the function's keywords {sorted(keys)} are not the row's parameters "
            f"{sorted(declared)} plus the caller-filled {sorted(call_args(spec))}"
        )
    return spec
