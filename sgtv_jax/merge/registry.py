"""Merge methods by name, read from the one table `specs.METHOD_SPECS` (mergekit's names, plus ours).

The mergekit-named task-arithmetic methods have no function of their own
(each is a row over `generalized_task_arithmetic`); they are bound here to
their public names, e.g. `sgtv_jax.merge.ties`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sgtv_jax.merge.specs import METHOD_SPECS

METHODS: dict[str, Callable[..., Any]] = {name: spec.fn for name, spec in METHOD_SPECS.items() if spec.fn}

task_arithmetic = METHODS["task_arithmetic"]
ties = METHODS["ties"]
dare_linear = METHODS["dare_linear"]
dare_ties = METHODS["dare_ties"]
della = METHODS["della"]
della_linear = METHODS["della_linear"]
breadcrumbs = METHODS["breadcrumbs"]
breadcrumbs_ties = METHODS["breadcrumbs_ties"]
magnitude_linear = METHODS["magnitude_linear"]


def available_methods() -> tuple[str, ...]:
    """Names accepted by `get_method` and `sgtv_jax.merge.merge`."""
    return tuple(METHODS)


def get_method(name: str) -> Callable[..., Any]:
    """The tensor-level merge function `f(deltas [T, ...], weights, ...) -> [...]` for `name`."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown merge method {name!r}; known methods: {', '.join(METHODS)}") from None
