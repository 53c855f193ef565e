"""Parameter specs: a value that may vary from tensor to tensor, and its value for one tensor.

A spec is one of

* a plain value, the same for every tensor;
* a callable `name -> value` (Python API only);
* a gradient: a list of numbers interpolated linearly over the decoder blocks,
  `np.interp(layer / (num_layers - 1), linspace(0, 1, len), values)`; tensors
  outside the blocks sit at 0 (embeddings: names with `embed`, `wte`, `wpe`)
  or 1 (final norm, head); a one-number list is that number;
* filter rules: a non-empty list of mappings `{filter: substring, value: spec}`;
  the first rule whose `filter` is a substring of the tensor's name wins, a
  rule without `filter` matches every tensor, and its `value` is itself a spec
  (a gradient, nested rules).

Per-model parameters (density, weight, gamma, epsilon) hold one spec per
fine-tuned model; a model without one takes the default (`per_model`).

Both entry points resolve specs here: `sgtv_jax.merge.merge` (the Python API,
where a list that is not rules gives one entry per model) and the YAML configs
(`sgtv_jax.pipeline.config` / `planning`, where each model lists its own).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sgtv_jax.errors import SgtvError, short_repr

EMBEDDING_MARKS = ("embed", "wte", "wpe")
"""Substrings of tensor names that sit at gradient position 0 when outside the blocks."""


class SpecError(SgtvError):
    """A spec without a value for a tensor: no rule matches, a rule lacks `value`, a gradient lacks blocks."""


def is_rules(spec: Any) -> bool:
    """Whether `spec` is a list of filter rules (a non-empty list / tuple of mappings)."""
    return isinstance(spec, (list, tuple)) and len(spec) > 0 and all(isinstance(r, Mapping) for r in spec)


def is_gradient(spec: Any) -> bool:
    """Whether `spec` is a gradient (a non-empty list / tuple of real numbers, booleans excluded)."""
    return (
        isinstance(spec, (list, tuple))
        and len(spec) > 0
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in spec)
    )


def spec_values(spec: Any) -> list[Any]:
    """Every leaf value a spec can take (for validation); [] for None. Callables are not called."""
    if spec is None:
        return []
    if is_rules(spec):
        return [v for r in spec for v in spec_values(r.get("value"))]
    if is_gradient(spec):
        return list(spec)
    return [spec]


def layer_position(name: str, layer: int | None, num_layers: int) -> float:
    """Where tensor `name` sits on the gradient axis, in [0, 1] (`layer` None: outside the blocks)."""
    if layer is not None:
        return layer / max(num_layers - 1, 1)
    return 0.0 if any(k in name for k in EMBEDDING_MARKS) else 1.0


def resolve(spec: Any, name: str, layer: int | None = None, num_layers: int | None = None) -> Any:
    """The value of `spec` for tensor `name` in decoder block `layer` of `num_layers`.

    `num_layers` None: the block structure is unknown, so a gradient of more
    than one number cannot be placed (SpecError naming the tensor).
    """
    if callable(spec):
        return spec(name)
    if is_rules(spec):
        for rule in spec:
            if "value" not in rule:
                raise SpecError(f"filter rule {short_repr(dict(rule))} has no 'value'")
            filt = rule.get("filter")
            if filt is None or str(filt) in name:
                return resolve(rule["value"], name, layer, num_layers)
        raise SpecError(
            f"no filter rule matches tensor {name!r} in {short_repr(list(spec))} "
            "(add a rule without 'filter' as the default)"
        )
    if is_gradient(spec):
        if len(spec) == 1:
            return float(spec[0])
        if num_layers is None:
            raise SpecError(
                f"the gradient {short_repr(list(spec))} for tensor {name!r} needs the tensor's "
                "decoder block; give the blocks (block_of=...), one value, a callable or filter rules"
            )
        pos = layer_position(name, layer, num_layers)
        return float(np.interp(pos, np.linspace(0.0, 1.0, len(spec)), np.asarray(spec, float)))
    return spec


def split_per_model(spec: Any, tasks: int, what: str) -> list[Any]:
    """A per-model argument of the Python API as one spec per model.

    A list / tuple that is not filter rules, or a 1-D array, has one entry per
    model (its length must be `tasks`); anything else is shared by all models.
    """
    if isinstance(spec, (list, tuple)) and not is_rules(spec):
        entries = list(spec)
    elif hasattr(spec, "shape") and len(spec.shape) == 1:
        entries = list(np.asarray(spec))
    else:
        return [spec] * tasks
    if len(entries) != tasks:
        raise SpecError(f"{what} has {len(entries)} entries but there are {tasks} fine-tuned models")
    return entries


def per_model(
    specs: Sequence[Any], name: str, default: Any, layer: int | None = None, num_layers: int | None = None
) -> tuple[Any, ...]:
    """Each model's value of a per-model parameter for tensor `name`; a model whose spec is
    (or resolves to) None takes `default`.

    `default` is the parameter's global value or, without one, the method's
    default, so one model lacking a value never changes the others'.
    """
    values = (None if s is None else resolve(s, name, layer, num_layers) for s in specs)
    return tuple(default if v is None else v for v in values)
