"""Model Stock (Jang et al. 2024) with mergekit's rule for the angle: pure JAX, on task vectors.

`deltas` `[T, ...]` (T >= 2 fine-tunes of one base) -> merged task vector `[...]`;
the merged tensor is `theta_0 + result`. No base weights are needed: the
method reads the task vectors' angles and interpolates between the base and
the models' average.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge import _validate
from sgtv_jax.merge.interpolation import unit_weights
from sgtv_jax.merge.methods import Floats


def _where(name: str | None) -> str:
    return f" for tensor {name!r}" if name else ""


def model_stock(
    deltas: jax.Array, weights: Floats = 1.0, *, filter_wise: bool = False, name: str | None = None
) -> jax.Array:
    """`t * mean_t tau_t` with `t = N c / (1 + (N - 1) c)`, `c` the mean pairwise cosine.

    `c` is the mean over pairs `i < j` of `<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6)`
    (clipped to [-1, 1]), over the whole tensor, or with `filter_wise` per
    vector along the last axis (per output row of an `[out, in]` matrix; a
    vector is one row), giving one `t` per row. N = T >= 2. `1 + (N-1) c = 0`
    (the task vectors cancel) is an error. Per-model weights are not part of
    the method (mergekit has none): any weight other than 1 is refused.
    """
    guard = _checks.Guard()
    x = _validate.stack(deltas, name, guard=guard, min_ndim=0)
    tasks = x.shape[0]
    if tasks < 2:
        raise ValueError(
            f"model_stock needs at least two fine-tuned models besides the base, got {tasks}{_where(name)}"
        )
    unit_weights(weights, tasks, "model_stock", name, guard)
    x = x.astype(_validate.work_dtype(x.dtype))
    shape = x.shape[1:]
    if filter_wise:
        v = x.reshape(tasks, 1, -1) if x.ndim <= 2 else x
    else:
        v = x.reshape(tasks, -1)
    norms = jnp.linalg.norm(v, axis=-1)
    cos = []
    for i in range(tasks):
        for j in range(i + 1, tasks):
            c = jnp.sum(v[i] * v[j], axis=-1) / jnp.maximum(norms[i] * norms[j], 1e-6)
            cos.append(jnp.clip(c, -1, 1))
    c = jnp.mean(jnp.stack(cos), axis=0)[..., None]
    denom = 1 + (tasks - 1) * c
    guard.require(
        jnp.all(denom != 0),
        f"model_stock: the task vectors' mean cosine is -1/(N-1){_where(name)}, so t is undefined",
    )
    t = tasks * c / jnp.where(denom == 0, 1, denom)
    out = t * jnp.mean(v, axis=0)
    return guard.apply(out.reshape(shape))
