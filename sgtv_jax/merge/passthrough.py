"""Passthrough (mergekit's `passthrough`): one model's tensor, optionally scaled.

`deltas` `[1, ...]` and `base` `[...]` -> task vector `[...]` of `scale * theta_1`
(the merged tensor is `theta_0 + result`). Used with slices to stack layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge.interpolation import unit_weights
from sgtv_jax.merge.methods import Floats


def passthrough(
    deltas: jax.Array,
    weights: Floats = 1.0,
    *,
    scale: float | jax.Array = 1.0,
    base: jax.Array | None = None,
    name: str | None = None,
) -> jax.Array:
    """`scale * theta_1 - theta_0 = (scale - 1) theta_0 + scale tau` (just `tau` when scale is 1).

    `base` is needed only for `scale != 1`. deltas `[1, ...]`. mergekit gives
    `scale` per model; with one model that is this one value.
    """
    where = _checks.where(name)
    guard = _checks.Guard()
    x = _checks.stack(deltas, name, guard=guard, min_ndim=0)
    if x.shape[0] != 1:
        raise ValueError(f"passthrough takes exactly one model's tensor, got {x.shape[0]} fine-tuned models{where}")
    unit_weights(weights, 1, "passthrough", name, guard)
    d = x[0].astype(_checks.work_dtype(x.dtype))
    guard.finite(jnp.asarray(scale), "scale")
    if not _checks.is_traced(scale) and float(scale) == 1.0:
        return guard.apply(d)
    if base is None:
        raise ValueError(f"passthrough with scale != 1 needs base=theta_0{where}")
    b = _checks.as_array(base, "base")
    if tuple(b.shape) != tuple(d.shape):
        raise ValueError(f"base has shape {tuple(b.shape)} but the task vector {tuple(d.shape)}{where}")
    s = jnp.asarray(scale, d.dtype)
    return guard.apply((s - 1) * b.astype(d.dtype) + s * d)
