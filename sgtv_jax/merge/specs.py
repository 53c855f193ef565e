"""What each merge method is and takes, as data: one table read by config validation.

`METHOD_SPECS[name]` says what method `name` (see `registry.METHODS`) does
(sign consensus, default trim, normalize / rescale defaults, whether it needs
Gram matrices or the base weights) and which parameters a config may set in
its top-level `parameters`, each with a type, default and range.
`PER_MODEL_PARAMS` are the parameters given per fine-tuned model (density,
weight, gamma, epsilon). The method functions' own signatures must agree
with this table; `tests/test_merge_specs.py` checks that they do.

Parameter kinds: "bool" (YAML `true` / `false` only, never a quoted string),
"float" (a finite real; `.nan` / `.inf` refused), "int", "choice" (one of
`choices`). A default of None means "the method's own rule" (e.g. `rescale`:
`MethodSpec.rescale_default`, off for calibration trims). A `required`
parameter has no default: a config must set it (slerp's and nearswap's `t`).

Function convention (every method, `registry.METHODS[name]`):
`f(deltas [T, ...], weights [T], *, <parameters>, name=...) -> [...]`, the merged
*task vector* (the merged tensor is `theta_0 + result`); `deltas[t] = theta_t -
theta_0` in config order, 2-D tensors in PyTorch `[out, in]` layout. Methods
with `trims` also take `densities` (third positional), `trim`, `key`, `calib`,
`gamma`, `epsilon`, `blocksize`, `percdamp`, `refit`. Methods with `needs_base`
also take `base=theta_0` `[...]` (same layout as one task vector): slerp,
karcher and arcee_fusion always read it, linear (normalize false) and
passthrough (scale != 1) for some settings. `min_models` / `max_models` bound T.
`REFUSED` names the mergekit methods not implemented, each with the reason.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from sgtv_jax.merge.trim import COUNTS

KINDS = ("bool", "float", "int", "choice")

KARCHER_MAX_ITER = 10_000
"""karcher's `max_iter` bound: it converges in tens of iterations; 10k bounds a tensor's loop to seconds."""
MAX_LEARNING_STEPS = 100_000
"""AdaMerging's and WUDI's `steps` bound (their defaults are 100 and 300): a run stays finite."""


class ParamSpec(NamedTuple):
    """One parameter: `name` as written in a config (`lambda`, not `lambda_`).

    `lo` / `hi`: inclusive bounds for numbers (None: unbounded), `lo` exclusive
    when `lo_open` (a step size "> 0"); iteration counts always have a finite
    `hi` (`KARCHER_MAX_ITER`, `MAX_LEARNING_STEPS`), so no config can ask for an endless loop.
    `choices`: the allowed values of a "choice"; `arg`: the keyword of the
    method function. Config validation (`sgtv check`, `sgtv merge`) and the
    Python API's `sgtv_jax.merge.merge` enforce these ranges.
    """

    name: str
    kind: str
    default: Any
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
    """A merge method's behaviour and its `parameters`.

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

    def param(self, name: str) -> ParamSpec | None:
        """The parameter called `name` in a config, or None."""
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


PER_MODEL_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("density", "float", 1.0, 0.0, 1.0, "fraction of each task vector the trim keeps", arg="densities"),
    ParamSpec("weight", "float", 1.0, None, None, "the model's weight in the combination", arg="weights"),
    ParamSpec("gamma", "float", 0.01, 0.0, 1.0, "breadcrumbs: fraction of largest entries dropped as outliers"),
    ParamSpec("epsilon", "float", 0.15, 0.0, 0.5, "magprune (DELLA): keep-probability spread around density"),
)
"""Per-model parameters (each model's `parameters`, or top-level as the default for all)."""

# The method functions' keywords that callers fill in (task vectors, per-model values, the
# PRNG key, calibration, the trim and its OBS options): never `parameters` of a config.
# The one list of them; `call_args` says which a given method takes.
COMMON_ARGS = ("deltas", "weights", "name")
TRIM_ARGS = ("densities", "key", "calib", "gamma", "epsilon", "trim", "blocksize", "percdamp", "refit")

_NORMALIZE = "divide by the sum of the (agreeing) weights"


_RESCALE = ParamSpec("rescale", "bool", None, doc="multiply survivors by 1/density (None: the method's rule)")
_COUNT = ParamSpec(
    "count",
    "choice",
    "round",
    choices=COUNTS,
    doc="entries a magnitude / breadcrumbs / wanda trim keeps: round(density*n), or floor = mergekit's int(density*n)",
)


def _common(normalize: bool, consensus: bool) -> tuple[ParamSpec, ...]:
    out: tuple[ParamSpec, ...] = (
        ParamSpec("normalize", "bool", normalize, doc=_NORMALIZE),
        ParamSpec("lambda", "float", 1.0, doc="scale of the merged task vector", arg="lambda_"),
        _RESCALE,
        _COUNT,
    )
    if consensus:
        out += (ParamSpec("consensus", "choice", "sum", doc="sign election rule", choices=("sum", "count")),)
    return out


def _gta(name: str, *, trim: str | None, consensus: bool, normalize: bool, rescale: bool, doc: str) -> MethodSpec:
    return MethodSpec(
        name,
        _common(normalize, consensus),
        trims=True,
        default_trim=trim,
        consensus="sum" if consensus else None,
        normalize_default=normalize,
        rescale_default=rescale,
        doc=doc,
        entrywise=True,
    )


METHOD_SPECS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec(
            "linear",
            (ParamSpec("normalize", "bool", True, doc=_NORMALIZE),),
            trims=False,
            default_trim=None,
            consensus=None,
            normalize_default=True,
            rescale_default=False,
            needs_base=True,
            base_optional=True,
            doc="weighted average of the models (model soup)",
            entrywise=True,
        ),
        _gta(
            "task_arithmetic",
            trim=None,
            consensus=False,
            normalize=False,
            rescale=False,
            doc="lambda * sum_t w_t tau_t",
        ),
        _gta(
            "ties",
            trim="magnitude",
            consensus=True,
            normalize=True,
            rescale=False,
            doc="magnitude trim, sign election, disjoint mean",
        ),
        _gta(
            "dare_linear",
            trim="random",
            consensus=False,
            normalize=False,
            rescale=True,
            doc="random drop and 1/density rescale, then sum",
        ),
        _gta(
            "dare_ties",
            trim="random",
            consensus=True,
            normalize=False,
            rescale=True,
            doc="random drop and rescale, sign election, disjoint sum",
        ),
        _gta(
            "della",
            trim="magprune",
            consensus=True,
            normalize=True,
            rescale=True,
            doc="MagPrune, sign election, disjoint mean",
        ),
        _gta("della_linear", trim="magprune", consensus=False, normalize=False, rescale=True, doc="MagPrune, then sum"),
        _gta(
            "breadcrumbs",
            trim="breadcrumbs",
            consensus=False,
            normalize=False,
            rescale=False,
            doc="drop outliers and the smallest entries, sum",
        ),
        _gta(
            "breadcrumbs_ties",
            trim="breadcrumbs",
            consensus=True,
            normalize=False,
            rescale=False,
            doc="breadcrumbs trim, sign election, disjoint sum",
        ),
        MethodSpec(
            "regmean",
            (ParamSpec("alpha", "float", 0.9, 0.0, 1.0, doc="scale of the Grams' off-diagonal entries"),),
            trims=False,
            default_trim=None,
            consensus=None,
            normalize_default=None,
            rescale_default=False,
            needs_grams=True,
            doc="closed-form least-squares merge of linear layers from calibration Grams",
            entrywise=True,
        ),
    )
}


def _plain(
    name: str,
    params: tuple[ParamSpec, ...],
    doc: str,
    *,
    needs_base: bool = False,
    min_models: int = 1,
    max_models: int | None = None,
    **kw: Any,
) -> MethodSpec:
    """A method without a trim step or sign election (the interpolation and geometric methods)."""
    return MethodSpec(
        name,
        params,
        trims=False,
        default_trim=None,
        consensus=None,
        normalize_default=None,
        rescale_default=False,
        needs_base=needs_base,
        doc=doc,
        min_models=min_models,
        max_models=max_models,
        **kw,
    )


_NEW = (
    _plain(
        "slerp",
        (ParamSpec("t", "float", None, doc="interpolation factor: 0 the base model, 1 the other", required=True),),
        "spherical interpolation between the base and one model (linear when nearly parallel)",
        needs_base=True,
        max_models=1,
    ),
    _plain(
        "nuslerp",
        (
            ParamSpec("nuslerp_flatten", "bool", True, doc="one slerp over the whole tensor"),
            ParamSpec(
                "nuslerp_row_wise",
                "bool",
                False,
                doc="without flatten: slerp the vectors along the first axis, not the last",
            ),
        ),
        "slerp of two task vectors at t = w_1 / (w_0 + w_1)",
        min_models=2,
        max_models=2,
        stored_layout=True,
    ),
    _plain(
        "multislerp",
        (
            ParamSpec("normalize_weights", "bool", True, doc="divide the weights by their sum"),
            ParamSpec("eps", "float", 1e-8, 0.0, math.inf, doc="numerical floor of norms"),
            ParamSpec(
                "whole_weights",
                "bool",
                False,
                doc="interpolate the models' weights, not task vectors: mergekit's rule without base_model "
                "(set when base_model is left out)",
            ),
        ),
        "weighted barycentre of the task vectors (of the weights without base_model) on the sphere, "
        "scaled by their mean norm",
        needs_base=True,
        base_optional=True,
    ),
    _plain(
        "karcher",
        (
            ParamSpec("max_iter", "int", 10, 1, KARCHER_MAX_ITER, doc="most Riemannian mean iterations"),
            ParamSpec("tol", "float", 1e-5, 0.0, math.inf, doc="convergence and zero-norm tolerance"),
        ),
        "Riemannian (Karcher) mean of the models' weights (the base model's too when given) on the sphere, "
        "scaled by their mean norm",
        needs_base=True,
        base_optional=True,
        base_point=True,
    ),
    _plain(
        "model_stock",
        (ParamSpec("filter_wise", "bool", False, doc="one interpolation factor per row"),),
        "interpolate base -> models' mean by t from the task vectors' mean cosine",
        min_models=2,
        stored_layout=True,
    ),
    MethodSpec(
        "sce",
        (
            ParamSpec(
                "select_topk", "float", 1.0, 0.0, 1.0, doc="fraction of entries of largest variance across models kept"
            ),
            _RESCALE,
            _COUNT,
        ),
        trims=True,
        default_trim=None,
        consensus=None,
        normalize_default=None,
        rescale_default=False,
        doc="select by variance, weights from mean squares, sign election, disjoint weighted mean",
    ),
    _plain(
        "nearswap",
        (
            ParamSpec(
                "t",
                "float",
                None,
                0.0,
                math.inf,
                required=True,
                doc="distance below which the other model's value is taken",
            ),
        ),
        "move each entry to the other model by min(1, t / |change|)",
        max_models=1,
    ),
    _plain(
        "arcee_fusion",
        (),
        "keep changes whose |change| * row KL divergence is >= median + 1.5 IQR",
        needs_base=True,
        max_models=1,
        stored_layout=True,
    ),
    _plain(
        "passthrough",
        (ParamSpec("scale", "float", 1.0, doc="multiply the model's tensor"),),
        "one model's tensor, optionally scaled",
        needs_base=True,
        max_models=1,
    ),
)
METHOD_SPECS.update({s.name: s for s in _NEW})

_FIT_TRIM = (
    ParamSpec("rescale", "bool", None, doc="multiply trim survivors by 1/density (None: off)"),
    ParamSpec("count", "choice", "round", choices=COUNTS, doc="entries a magnitude / breadcrumbs / wanda trim keeps"),
)
_ALPHA = ParamSpec("alpha", "float", 0.9, 0.0, 1.0, doc="scale of the Grams' off-diagonal entries")


def _fit(name: str, params: tuple[ParamSpec, ...], doc: str, **kw: Any) -> MethodSpec:
    """A Hessian-fit method (`sgtv_jax.merge.hessian_fit`): trims, reads the calibration Grams."""
    return MethodSpec(
        name,
        _FIT_TRIM + params,
        trims=True,
        default_trim="magnitude",
        consensus=None,
        normalize_default=None,
        rescale_default=False,
        needs_grams=True,
        doc=doc,
        **kw,
    )


_FITS = (
    _fit(
        "lstsq",
        (
            ParamSpec(
                "sign_election",
                "choice",
                "none",
                choices=("none", "sum", "count"),
                doc="TIES sign election on the trimmed vectors before the fit",
            ),
        ),
        "per-layer least-squares coefficients of the trimmed task vectors against every task's "
        "outputs (a T x T solve from the per-task Grams)",
        needs_targets=True,
    ),
    _fit("regmean_trim", (_ALPHA,), "RegMean's closed form on the trimmed task vectors (e.g. OBS-trimmed)"),
    _fit(
        "regmean_sparse",
        (_ALPHA,),
        "one sparse task vector: the dense RegMean optimum trimmed to the mean density "
        "(OBS against the summed Grams with trim sparsegpt)",
        trims_merged=True,
    ),
)
METHOD_SPECS.update({s.name: s for s in _FITS})

LEARNED_TRIMS = ("magnitude", "breadcrumbs", "random")
"""Trims a method with `learns_weights` composes with: the data-free ones the learning pass applies to
whole Flax models too (`adamerging.FLAX_TRIMS`); magprune is not applied there, calibration trims
need per-layer statistics. `random` draws other masks there than in the merge (`sgtv_jax.pipeline.adamerge`)."""

METHOD_SPECS["adamerging"] = MethodSpec(
    "adamerging",
    (
        ParamSpec("steps", "int", 100, 1, MAX_LEARNING_STEPS, doc="learning steps (Adam), one calibration batch each"),
        ParamSpec(
            "learning_rate", "float", 1e-3, 0.0, math.inf, doc="Adam step size of the coefficients (> 0)", lo_open=True
        ),
        ParamSpec("init", "float", 0.3, doc="every coefficient's starting value (in [0, 1] with clip)"),
        ParamSpec("clip", "bool", True, doc="project the coefficients onto [0, 1] after each step"),
        _RESCALE,
        _COUNT,
    ),
    trims=True,
    default_trim=None,
    consensus=None,
    normalize_default=None,
    rescale_default=False,
    doc="layer-wise coefficients learned by entropy minimisation on unlabeled calibration text "
    "(AdaMerging), then task arithmetic with them",
    entrywise=True,
    learns_weights=True,
)

METHOD_SPECS["wudi"] = _plain(
    "wudi",
    (
        ParamSpec("steps", "int", 300, 0, MAX_LEARNING_STEPS, doc="Adam steps from the task vectors' sum"),
        ParamSpec("learning_rate", "float", 1e-5, 0.0, math.inf, doc="Adam step size (> 0)", lo_open=True),
    ),
    "data-free: each linear layer's merged task vector fits every task vector's rows as that task's "
    "inputs (WUDI; Adam from the sum); other tensors summed",
)

_RAM_EPSILON = ParamSpec(
    "epsilon",
    "float",
    1e-5,
    0.0,
    math.inf,
    doc="|change| above which an entry contributes (top-level: not DELLA's per-model epsilon)",
    arg="threshold",
)
METHOD_SPECS["ram"] = _plain(
    "ram",
    (_RAM_EPSILON,),
    "Reinforced Agent Merging: an entry one task changes keeps its change, one several change takes their mean",
    entrywise=True,
)
METHOD_SPECS["ramplus_tl"] = _plain(
    "ramplus_tl",
    (
        ParamSpec("r", "float", 0.1, doc="scale of the unique entries' boost"),
        ParamSpec("alpha", "float", 0.2, doc="upper clip of each task's shared / unique ratio"),
        _RAM_EPSILON,
    ),
    "RAM+ tensor-local: RAM with each task's unique entries scaled by 1 + r * clip(shared/unique, 0, alpha)",
)

_UNMERGED = (
    "not in mergekit's registry (main at a6e4028, 2026-06-17): only in an unmerged mergekit {}; not implemented here"
)
METHOD_SPECS["core_space"] = _plain(
    "core_space",
    (),
    "Core Space (mergekit pull request, not in its registry): each task vector's rank-r SVD, projected on "
    "shared SVD bases, averaged there; the models' one common weight scales the result",
)

REFUSED: dict[str, str] = {
    "lrp": _UNMERGED.format("pull request") + " (it reads relevance scores computed from data, lrp_path)",
    "cabs": _UNMERGED.format("pull request")
    + " as a config method (its per-model n_val / m_val and pruning_order; the library function "
    "sgtv_jax.merge.cabs.cabs has its rule)",
    "pcb": _UNMERGED.format("branch ('pcb', 2024)")
    + " as a config method (the library function sgtv_jax.merge.pcb.pcb has the branch's rule)",
}
"""mergekit method names that a config may not use here, with the reason."""

MERGEKIT_REGISTRY: tuple[str, ...] = (
    *("linear", "slerp", "nuslerp", "passthrough", "model_stock", "arcee_fusion", "karcher"),
    *("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della"),
    *("della_linear", "multislerp", "nearswap", "ram", "ramplus_tl", "sce"),
)
"""Every method name mergekit registers (main at a6e4028, 2026-06-17: `merge_methods/registry.py`'s
`STATIC_MERGE_METHODS` and the `easy_define` ones its `__init__` imports); each is implemented here."""

WITHOUT_EFFECT: dict[str, str] = {
    "int8_mask": "mergekit keeps its masks as int8 to save memory; masks here are booleans, same result",
}
"""mergekit's top-level `parameters` a config may set (true / false) that change nothing here, with the reason."""


def call_args(spec: MethodSpec) -> tuple[str, ...]:
    """The keywords of `spec`'s method function besides its `params`, from what the method does."""
    return (
        COMMON_ARGS
        + (TRIM_ARGS if spec.trims else ())
        + (("grams",) if spec.needs_grams else ())
        + (("targets",) if spec.needs_targets else ())
        + (("base",) if spec.needs_base else ())
    )


CALLER_ARGS = frozenset(a for s in METHOD_SPECS.values() for a in call_args(s))
"""Every caller-filled keyword of any method function."""


def method_spec(name: str) -> MethodSpec:
    """The spec of method `name`; ValueError listing the known methods."""
    if isinstance(name, str) and name in REFUSED:
        raise ValueError(f"merge method {name!r} is not supported: {REFUSED[name]}")
    try:
        return METHOD_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown merge method {name!r}; known methods: {', '.join(METHOD_SPECS)}") from None
