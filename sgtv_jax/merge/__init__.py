"""Model merging: trim / elect / combine building blocks, mergekit-named methods, RegMean.

Tensor level (pure functions on a stack of task vectors `[T, ...]`, returning
the merged task vector): `linear`, `task_arithmetic`, `ties`, `dare_linear`,
`dare_ties`, `della`, `della_linear`, `breadcrumbs`, `breadcrumbs_ties`, `magnitude_linear`,
`regmean`, `slerp`, `nuslerp`, `multislerp`, `karcher`, `model_stock`, `sce`,
`nearswap`, `arcee_fusion`, `passthrough`, `wudi`, `tsv`, `iso_c`, `iso_cts`, the Hessian fits
(`hessian_fit`) and `adamerging`, all reachable by name with `get_method`;
what each takes: its row in `specs.METHOD_SPECS`. Model level: `merge(method, base,
models, ...)` over pytrees / dicts with per-model and per-tensor
parameters (specs: `paramspec`), each tensor merged by `plan.merge_planned`. The
PyTorch original's API: `TIES().merge(...)`, `DARE().merge(...)`.
"""

from sgtv_jax.merge import combine, elect, keys, trim
from sgtv_jax.merge.arcee_fusion import arcee_fusion
from sgtv_jax.merge.compat import DARE, TIES
from sgtv_jax.merge.interpolation import karcher, multislerp, nuslerp, slerp
from sgtv_jax.merge.iso import iso_c, iso_cts
from sgtv_jax.merge.methods import generalized_task_arithmetic, linear
from sgtv_jax.merge.model import merge
from sgtv_jax.merge.model_stock import model_stock
from sgtv_jax.merge.nearswap import nearswap
from sgtv_jax.merge.paramspec import resolve
from sgtv_jax.merge.passthrough import passthrough
from sgtv_jax.merge.registry import (
    METHODS,
    available_methods,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    get_method,
    magnitude_linear,
    task_arithmetic,
    ties,
)
from sgtv_jax.merge.regmean import regmean
from sgtv_jax.merge.sce import sce
from sgtv_jax.merge.trim import TRIMS, Calibration
from sgtv_jax.merge.tsv import tsv
from sgtv_jax.merge.wudi import wudi

__all__ = [
    "Calibration",
    "DARE",
    "METHODS",
    "TIES",
    "TRIMS",
    "arcee_fusion",
    "available_methods",
    "breadcrumbs",
    "breadcrumbs_ties",
    "combine",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "elect",
    "generalized_task_arithmetic",
    "get_method",
    "iso_c",
    "iso_cts",
    "karcher",
    "keys",
    "linear",
    "magnitude_linear",
    "merge",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "regmean",
    "resolve",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
    "trim",
    "tsv",
    "wudi",
]
