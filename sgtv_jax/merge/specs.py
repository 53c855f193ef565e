"""Every merge method, one row each: `METHOD_SPECS`, read by config validation, `sgtv methods` and the docs.

A row (`row.MethodSpec`, made by `row.method_row`) names the method's function
and declares its config parameters (type, range, doc) and what it needs;
defaults and keywords are read from the function's signature. The
mergekit-named task-arithmetic methods are rows over one function
(`methods.variant` of `generalized_task_arithmetic`), their defaults given in
the row. `registry.METHODS` and the public functions (`sgtv_jax.merge.ties`,
...) are read from this table; `sgtv methods` prints it and
`python -m sgtv_jax.merge.docs` writes docs/methods-reference.md from it.
To add a method: CONTRIBUTING.md.

`PER_MODEL_PARAMS` are the parameters given per fine-tuned model (density,
weight, gamma, epsilon), their defaults those of the trims that read them.
`REFUSED` names the mergekit methods not implemented, each with the reason.
"""

from __future__ import annotations

import math
from typing import Any

from sgtv_jax.defaults import MAX_LEARNING_STEPS
from sgtv_jax.merge import methods
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.adamerging import OBJECTIVES, adamerging
from sgtv_jax.merge.arcee_fusion import arcee_fusion
from sgtv_jax.merge.core_space import core_space
from sgtv_jax.merge.gram_balance import GRAM_NORMS, NO_GRAM
from sgtv_jax.merge.hessian_fit import lstsq, regmean_sparse, regmean_trim
from sgtv_jax.merge.interpolation import KARCHER_MAX_ITER, karcher, multislerp, nuslerp, slerp
from sgtv_jax.merge.iso import iso_c, iso_cts
from sgtv_jax.merge.model_stock import model_stock
from sgtv_jax.merge.nearswap import nearswap
from sgtv_jax.merge.passthrough import passthrough
from sgtv_jax.merge.ram import ram, ramplus_tl
from sgtv_jax.merge.regmean import regmean
from sgtv_jax.merge.row import COMMON_ARGS, KINDS, TRIM_ARGS, MethodSpec, ParamSpec, call_args, method_row
from sgtv_jax.merge.sce import sce
from sgtv_jax.merge.tsv import tsv
from sgtv_jax.merge.wudi import SOLVERS as wudi_solvers
from sgtv_jax.merge.wudi import wudi

__all__ = [
    "CALLER_ARGS",
    "COMMON_ARGS",
    "KARCHER_MAX_ITER",
    "KINDS",
    "LEARNED_TRIMS",
    "MAX_LEARNING_STEPS",
    "MERGEKIT_REGISTRY",
    "METHOD_SPECS",
    "PER_MODEL_DEFAULTS",
    "PER_MODEL_PARAMS",
    "REFUSED",
    "TRIM_ARGS",
    "WITHOUT_EFFECT",
    "MethodSpec",
    "ParamSpec",
    "call_args",
    "method_spec",
]

PER_MODEL_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("density", "float", 1.0, 0.0, 1.0, "fraction of each task vector the trim keeps", arg="densities"),
    ParamSpec("weight", "float", 1.0, None, None, "the model's weight in the combination", arg="weights"),
    ParamSpec(
        "gamma", "float", trim_lib.GAMMA, 0.0, 1.0, "breadcrumbs: fraction of largest entries dropped as outliers"
    ),
    ParamSpec(
        "epsilon", "float", trim_lib.EPSILON, 0.0, 0.5, "magprune (DELLA): keep-probability spread around density"
    ),
)
"""Per-model parameters (each model's `parameters`, or top-level as the default for all)."""
PER_MODEL_DEFAULTS: dict[str, Any] = {ps.name: ps.default for ps in PER_MODEL_PARAMS}

_NORMALIZE = ParamSpec("normalize", "bool", doc="divide by the sum of the (agreeing) weights")
_LAMBDA = ParamSpec("lambda", "float", doc="scale of the merged task vector", arg="lambda_")
_RESCALE = ParamSpec("rescale", "bool", doc="multiply survivors by 1/density (None: the method's rule)")
_COUNT = ParamSpec(
    "count",
    "choice",
    choices=trim_lib.COUNTS,
    doc="entries a magnitude / breadcrumbs / wanda trim keeps: round(density*n), or floor = mergekit's int(density*n)",
)
_CONSENSUS = ParamSpec("consensus", "choice", doc="sign election rule", choices=("sum", "count"))
_ALPHA = ParamSpec("alpha", "float", lo=0.0, hi=1.0, doc="scale of the Grams' off-diagonal entries")
_BALANCE = (  # every Hessian fit's Gram options (sgtv_jax.merge.gram_balance)
    ParamSpec(
        "gram_norm",
        "choice",
        choices=GRAM_NORMS,
        doc="divide each task's Gram by its mean diagonal (trace) or its task vector's output energy "
        "||D_t X_t||^2 (energy), so no task outweighs the others; none: as given",
    ),
    ParamSpec(
        "proxy_gram",
        "float",
        lo=0.0,
        hi=math.inf,
        doc="beta: add beta times each task's proxy Gram D_t^T D_t / ||D_t||^2 (WUDI's), normalised as "
        "gram_norm says; 0: the data alone, large: WUDI's closed form; > 0 lets a model go without calibration",
    ),
    ParamSpec(
        "no_gram",
        "choice",
        choices=NO_GRAM,
        doc="tensors without a Gram (norms, biases): the task vectors' mean (RegMean's) or sum",
    ),
)


def _gta(name: str, *, trim: str | None, consensus: str | None, normalize: bool, rescale: bool, doc: str) -> MethodSpec:
    """A mergekit-named task-arithmetic method: a row over `generalized_task_arithmetic`."""
    fn = methods.variant(name, trim=trim, consensus=consensus, normalize=normalize, rescale=rescale, doc=doc)
    params = (_NORMALIZE, _LAMBDA, _RESCALE, _COUNT) + ((_CONSENSUS,) if consensus else ())
    return method_row(fn, name, params, doc, rescale_default=rescale, entrywise=True)


_ROWS: tuple[MethodSpec, ...] = (
    method_row(
        methods.linear,
        "linear",
        (_NORMALIZE,),
        "weighted average of the models (model soup)",
        base_optional=True,
        entrywise=True,
    ),
    _gta("task_arithmetic", trim=None, consensus=None, normalize=False, rescale=False, doc="lambda * sum_t w_t tau_t"),
    _gta(
        "ties",
        trim="magnitude",
        consensus="sum",
        normalize=True,
        rescale=False,
        doc="magnitude trim, sign election, disjoint mean",
    ),
    _gta(
        "dare_linear",
        trim="random",
        consensus=None,
        normalize=False,
        rescale=True,
        doc="random drop and 1/density rescale, then sum",
    ),
    _gta(
        "dare_ties",
        trim="random",
        consensus="sum",
        normalize=False,
        rescale=True,
        doc="random drop and rescale, sign election, disjoint sum",
    ),
    _gta(
        "della",
        trim="magprune",
        consensus="sum",
        normalize=True,
        rescale=True,
        doc="MagPrune, sign election, disjoint mean",
    ),
    _gta("della_linear", trim="magprune", consensus=None, normalize=False, rescale=True, doc="MagPrune, then sum"),
    _gta(
        "breadcrumbs",
        trim="breadcrumbs",
        consensus=None,
        normalize=False,
        rescale=False,
        doc="drop outliers and the smallest entries, sum",
    ),
    _gta(
        "breadcrumbs_ties",
        trim="breadcrumbs",
        consensus="sum",
        normalize=False,
        rescale=False,
        doc="breadcrumbs trim, sign election, disjoint sum",
    ),
    method_row(
        regmean,
        "regmean",
        (_ALPHA, *_BALANCE),
        "closed-form least-squares merge of linear layers from calibration Grams",
        entrywise=True,
    ),
    method_row(
        slerp,
        "slerp",
        (ParamSpec("t", "float", doc="interpolation factor: 0 the base model, 1 the other", required=True),),
        "spherical interpolation between the base and one model (linear when nearly parallel)",
        max_models=1,
    ),
    method_row(
        nuslerp,
        "nuslerp",
        (
            ParamSpec("nuslerp_flatten", "bool", doc="one slerp over the whole tensor"),
            ParamSpec(
                "nuslerp_row_wise", "bool", doc="without flatten: slerp the vectors along the first axis, not the last"
            ),
        ),
        "slerp of two task vectors at t = w_1 / (w_0 + w_1)",
        min_models=2,
        max_models=2,
        stored_layout=True,
    ),
    method_row(
        multislerp,
        "multislerp",
        (
            ParamSpec("normalize_weights", "bool", doc="divide the weights by their sum"),
            ParamSpec("eps", "float", lo=0.0, hi=math.inf, doc="numerical floor of norms"),
            ParamSpec(
                "whole_weights",
                "bool",
                doc="interpolate the models' weights, not task vectors: mergekit's rule without base_model "
                "(set when base_model is left out)",
            ),
        ),
        "weighted barycentre of the task vectors (of the weights without base_model) on the sphere, "
        "scaled by their mean norm",
        base_optional=True,
    ),
    method_row(
        karcher,
        "karcher",
        (
            ParamSpec("max_iter", "int", lo=1, hi=KARCHER_MAX_ITER, doc="most Riemannian mean iterations"),
            ParamSpec("tol", "float", lo=0.0, hi=math.inf, doc="convergence and zero-norm tolerance"),
        ),
        "Riemannian (Karcher) mean of the models' weights (the base model's too when given) on the sphere, "
        "scaled by their mean norm",
        base_optional=True,
        base_point=True,
    ),
    method_row(
        model_stock,
        "model_stock",
        (ParamSpec("filter_wise", "bool", doc="one interpolation factor per row"),),
        "interpolate base -> models' mean by t from the task vectors' mean cosine",
        min_models=2,
        stored_layout=True,
    ),
    method_row(
        sce,
        "sce",
        (
            ParamSpec(
                "select_topk", "float", lo=0.0, hi=1.0, doc="fraction of entries of largest variance across models kept"
            ),
            _RESCALE,
            _COUNT,
        ),
        "select by variance, weights from mean squares, sign election, disjoint weighted mean",
    ),
    method_row(
        nearswap,
        "nearswap",
        (
            ParamSpec(
                "t",
                "float",
                lo=0.0,
                hi=math.inf,
                doc="distance below which the other model's value is taken",
                required=True,
            ),
        ),
        "move each entry to the other model by min(1, t / |change|)",
        max_models=1,
    ),
    method_row(
        arcee_fusion,
        "arcee_fusion",
        (),
        "keep changes whose |change| * row KL divergence is >= median + 1.5 IQR",
        max_models=1,
        stored_layout=True,
    ),
    method_row(
        passthrough,
        "passthrough",
        (ParamSpec("scale", "float", doc="multiply the model's tensor"),),
        "one model's tensor, optionally scaled",
        max_models=1,
    ),
)

_FIT_TRIM = (
    ParamSpec("rescale", "bool", doc="multiply trim survivors by 1/density (None: off)"),
    ParamSpec("count", "choice", choices=trim_lib.COUNTS, doc="entries a magnitude / breadcrumbs / wanda trim keeps"),
)

_RAM_EPSILON = ParamSpec(
    "epsilon",
    "float",
    lo=0.0,
    hi=math.inf,
    doc="|change| above which an entry contributes (top-level: not DELLA's per-model epsilon)",
    arg="threshold",
)
_SVD_ALPHA = ParamSpec(
    "alpha",
    "float",
    lo=0.0,
    hi=math.inf,
    doc="scale of the merged task vector (the papers tune it on validation data in (0, 3])",
)

_UNMERGED = (
    "not in mergekit's registry (main at a6e4028, 2026-06-17): only in an unmerged mergekit {}; not implemented here"
)

_MORE_ROWS = (  # the table's second half (one tuple of 24 rows reads badly); new rows go at its end
    method_row(
        lstsq,
        "lstsq",
        _FIT_TRIM
        + (
            ParamSpec(
                "sign_election",
                "choice",
                choices=("none", "sum", "count"),
                doc="TIES sign election on the trimmed vectors before the fit",
            ),
        )
        + _BALANCE,
        "per-layer least-squares coefficients of the trimmed task vectors against every task's "
        "outputs (a T x T solve from the per-task Grams)",
    ),
    method_row(
        regmean_trim,
        "regmean_trim",
        _FIT_TRIM + (_ALPHA,) + _BALANCE,
        "RegMean's closed form on the trimmed task vectors (e.g. OBS-trimmed)",
    ),
    method_row(
        regmean_sparse,
        "regmean_sparse",
        _FIT_TRIM + (_ALPHA,) + _BALANCE,
        "one sparse task vector: the dense RegMean optimum trimmed to the mean density "
        "(OBS against the summed Grams with trim sparsegpt)",
        trims_merged=True,
    ),
    method_row(
        adamerging,
        "adamerging",
        (
            ParamSpec(
                "steps", "int", lo=1, hi=MAX_LEARNING_STEPS, doc="learning steps (Adam), one calibration batch each"
            ),
            ParamSpec(
                "learning_rate",
                "float",
                doc="Adam step size of the coefficients (> 0)",
                lo=0.0,
                hi=math.inf,
                lo_open=True,
            ),
            ParamSpec("init", "float", doc="every coefficient's starting value (in [0, 1] with clip)"),
            ParamSpec("clip", "bool", doc="project the coefficients onto [0, 1] after each step"),
            ParamSpec(
                "objective",
                "choice",
                choices=OBJECTIVES,
                doc="what the coefficients minimise: the merged model's prediction entropy, or (distill) the sum "
                "of each task's KL to its own specialist on its own models[].calibration",
            ),
            _RESCALE,
            _COUNT,
        ),
        "layer-wise coefficients learned by entropy minimisation on unlabeled calibration text "
        "(AdaMerging) or by distillation from each specialist, then task arithmetic with them",
        entrywise=True,
        learns_weights=True,
    ),
    method_row(
        wudi,
        "wudi",
        (
            ParamSpec("steps", "int", lo=0, hi=MAX_LEARNING_STEPS, doc="Adam steps from the task vectors' sum"),
            ParamSpec("learning_rate", "float", doc="Adam step size (> 0)", lo=0.0, hi=math.inf, lo_open=True),
            ParamSpec(
                "solver",
                "choice",
                choices=wudi_solvers,
                doc="adam: the paper's early-stopped Adam steps; exact: the loss's minimiser nearest the sum "
                "(one pseudo-inverse per layer, steps unused)",
            ),
        ),
        "data-free: each linear layer's merged task vector fits every task vector's rows as that task's "
        "inputs (WUDI; Adam from the sum); other tensors summed",
    ),
    _gta(
        "magnitude_linear",
        trim="magnitude",
        consensus=None,
        normalize=False,
        rescale=False,
        doc="magnitude trim (TIES' trim), no sign election, weighted sum: DARE's magnitude-pruning baseline",
    ),
    method_row(
        ram,
        "ram",
        (_RAM_EPSILON,),
        "Reinforced Agent Merging: an entry one task changes keeps its change, one several change takes their mean",
        entrywise=True,
    ),
    method_row(
        ramplus_tl,
        "ramplus_tl",
        (
            ParamSpec("r", "float", doc="scale of the unique entries' boost"),
            ParamSpec("alpha", "float", doc="upper clip of each task's shared / unique ratio"),
            _RAM_EPSILON,
        ),
        "RAM+ tensor-local: RAM with each task's unique entries scaled by 1 + r * clip(shared/unique, 0, alpha)",
    ),
    method_row(
        core_space,
        "core_space",
        (),
        "Core Space (mergekit pull request, not in its registry): each task vector's rank-r SVD, projected on "
        "shared SVD bases, averaged there; the models' one common weight scales the result",
    ),
    method_row(
        tsv,
        "tsv",
        (_SVD_ALPHA,),
        "data-free TSV-M (task singular vectors): each task vector's top 1/T singular triplets, the tasks' "
        "bases orthogonalised (polar factor), alpha times the result; other tensors averaged",
    ),
    method_row(
        iso_c,
        "iso_c",
        (_SVD_ALPHA,),
        "data-free Iso-C: the task vectors' sum with its singular values all set to their mean; other tensors averaged",
    ),
    method_row(
        iso_cts,
        "iso_cts",
        (
            _SVD_ALPHA,
            ParamSpec(
                "common_space_fraction",
                "float",
                lo=0.0,
                hi=1.0,
                doc="share of each matrix's rank kept from the sum's top singular directions; "
                "the rest is split evenly among the tasks' own directions",
            ),
        ),
        "data-free Iso-CTS: the sum's top singular directions plus each task's own (outside them), "
        "orthogonalised, with one flat singular value; other tensors averaged",
    ),
)

METHOD_SPECS: dict[str, MethodSpec] = {s.name: s for s in _ROWS + _MORE_ROWS}
"""The one table of merge methods, in the order `sgtv methods` and the reference list them."""

LEARNED_TRIMS = ("magnitude", "breadcrumbs", "random")
"""Trims a method with `learns_weights` composes with: the data-free ones the learning pass applies to
whole Flax models too (`adamerging.FLAX_TRIMS`); magprune is not applied there, calibration trims
need per-layer statistics. `random` draws other masks there than in the merge (`sgtv_jax.pipeline.adamerge`)."""

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
