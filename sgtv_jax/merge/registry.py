"""Merge methods by name (mergekit's names, plus `regmean`); what each takes: `specs.METHOD_SPECS`."""

from __future__ import annotations

from collections.abc import Callable

from sgtv_jax.merge import methods
from sgtv_jax.merge.adamerging import adamerging
from sgtv_jax.merge.arcee_fusion import arcee_fusion
from sgtv_jax.merge.core_space import core_space
from sgtv_jax.merge.hessian_fit import lstsq, regmean_sparse, regmean_trim
from sgtv_jax.merge.interpolation import karcher, multislerp, nuslerp, slerp
from sgtv_jax.merge.model_stock import model_stock
from sgtv_jax.merge.nearswap import nearswap
from sgtv_jax.merge.passthrough import passthrough
from sgtv_jax.merge.ram import ram, ramplus_tl
from sgtv_jax.merge.regmean import regmean
from sgtv_jax.merge.sce import sce
from sgtv_jax.merge.wudi import wudi

METHODS: dict[str, Callable] = {
    "linear": methods.linear,
    "task_arithmetic": methods.task_arithmetic,
    "ties": methods.ties,
    "dare_linear": methods.dare_linear,
    "dare_ties": methods.dare_ties,
    "della": methods.della,
    "della_linear": methods.della_linear,
    "breadcrumbs": methods.breadcrumbs,
    "breadcrumbs_ties": methods.breadcrumbs_ties,
    "regmean": regmean,
    "slerp": slerp,
    "nuslerp": nuslerp,
    "multislerp": multislerp,
    "karcher": karcher,
    "model_stock": model_stock,
    "sce": sce,
    "nearswap": nearswap,
    "arcee_fusion": arcee_fusion,
    "passthrough": passthrough,
    "lstsq": lstsq,
    "regmean_trim": regmean_trim,
    "regmean_sparse": regmean_sparse,
    "adamerging": adamerging,
    "wudi": wudi,
    "ram": ram,
    "ramplus_tl": ramplus_tl,
    "core_space": core_space,
}


def available_methods() -> tuple[str, ...]:
    """Names accepted by `get_method` and `sgtv_jax.merge.merge`."""
    return tuple(METHODS)


def get_method(name: str) -> Callable:
    """The tensor-level merge function `f(deltas [T, ...], weights, ...) -> [...]` for `name`."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown merge method {name!r}; known methods: {', '.join(METHODS)}") from None
