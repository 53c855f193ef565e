"""Merge methods by name (mergekit's names, plus `regmean`)."""

from __future__ import annotations

from typing import Callable

from sgtv_jax.merge import methods
from sgtv_jax.merge.regmean import regmean

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
}


def available_methods() -> tuple[str, ...]:
    """Names accepted by `get_method` and `sgtv_jax.merge.merge`."""
    return tuple(METHODS)


def get_method(name: str) -> Callable:
    """The tensor-level merge function `f(deltas [T, ...], weights, ...) -> [...]` for `name`."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown merge method {name!r}; known methods: {', '.join(METHODS)}"
        ) from None
