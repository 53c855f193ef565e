"""NearSwap (mergekit's `nearswap`): take the other model's value where it is already near the base's.

`deltas` `[1, ...]` -> merged task vector `[...]` (`theta_0 + result` is the
merged tensor). Defined entry by entry on `|theta_1 - theta_0| = |tau|`, so no
base weights are needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge.interpolation import one_model_stack
from sgtv_jax.merge.methods import Floats


def nearswap(
    deltas: jax.Array, weights: Floats = 1.0, *, t: float | jax.Array | None = None, name: str | None = None
) -> jax.Array:
    """`clip(t / max(|tau|, 1e-6), 0, 1) * tau` for the one model's task vector `tau`.

    An entry moves fully to the other model where `|tau| <= t` and by `t/|tau|`
    of the way elsewhere. `t` (required, >= 0) may be traced. deltas `[1, ...]`.
    """
    where = _checks.where(name)
    guard = _checks.Guard()
    x = one_model_stack(deltas, weights, "nearswap", name, guard)
    if t is None:
        raise ValueError(f"nearswap needs t (the distance below which the other model's value is taken){where}")
    tt = jnp.asarray(t)
    guard.require(
        jnp.isfinite(tt) & (tt >= 0),
        f"nearswap t must be a finite number >= 0, got {t!r}{where}"
        if not _checks.is_traced(t)
        else f"nearswap t must be a finite number >= 0{where}",
    )
    d = x[0].astype(_checks.work_dtype(x.dtype))
    w = jnp.clip(tt.astype(d.dtype) / jnp.maximum(jnp.abs(d), 1e-6), 0, 1)
    return guard.apply(w * d)
