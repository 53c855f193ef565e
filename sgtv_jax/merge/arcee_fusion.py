"""Arcee Fusion (mergekit's `arcee_fusion`): keep the changes that are both large and informative.

`deltas` `[1, ...]` and `base` `[...]` -> task vector `[...]` (`theta_0 + result`
is the merged tensor). The importance of an entry is its change times the KL
divergence of the softmax of its row in the fine-tuned model from the base's;
changes at or above `median + 1.5 IQR` of the importances are kept, the others
dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge.interpolation import one_model_stack
from sgtv_jax.merge.methods import Floats

QUANTILE_SAMPLE = 1_000_000
"""mergekit estimates the quantiles from a random sample of this many entries of larger tensors."""


def _quantile(sorted_flat: jax.Array, q: float) -> jax.Array:
    """`sorted[int(q * (n - 1))]`, the index computed in float32 as mergekit's torch code does."""
    n = sorted_flat.shape[0]
    i = jnp.floor(jnp.float32(q) * jnp.float32(n - 1)).astype(jnp.int32)
    return sorted_flat[i]


def _phi(d: jax.Array) -> jax.Array:
    """`(1 + d) log(1 + d) - d` (>= 0), by its series `sum_n>=2 (-d)^n / (n (n - 1))` where `|d| < 1/4`.

    The closed form loses about `1 / d^2` of float32's precision to cancellation
    (`d ~ 1e-2` for a fine-tune: 1e-3 relative); twelve terms reach 1e-9 there.
    """
    small = jnp.abs(d) < 0.25
    ds = jnp.where(small, d, 0)
    series = jnp.zeros_like(d)
    for n in range(13, 1, -1):  # Horner from the highest term down
        series = ds * (series + (-1) ** n / (n * (n - 1)))
    series = series * ds
    de = jnp.where(small, 0, d)
    closed = (1 + de) * jnp.log1p(de) - de
    return jnp.where(small, series, closed)


def importance(tau: jax.Array, base: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`|tau| * KL(p || q)` per row, `p = softmax(theta_1) + eps`, `q = softmax(theta_0) + eps` over the last axis.

    mergekit sums `p log(p / q)`, whose terms are first order in the change
    while their sum is second order: in float32 that leaves about 1e-3 relative
    error, enough to flip entries near the threshold. The same KL is computed
    here as `sum q phi(p / q - 1)` (`sum p = sum q`), with `p / q - 1` from
    `tau` itself: `softmax(theta_1) = softmax(theta_0) e^(tau - c)`, `c =
    log(1 + sum softmax(theta_0) (e^tau - 1))`; float32 then agrees with the
    float64 value of mergekit's formula to about 1e-6 relative.
    """
    sb = jax.nn.softmax(base, axis=-1)
    s = jnp.sum(sb * jnp.expm1(tau), axis=-1, keepdims=True)
    direct = jax.nn.logsumexp(base + tau, axis=-1, keepdims=True) - jax.nn.logsumexp(base, axis=-1, keepdims=True)
    c = jnp.where(jnp.abs(s) < 0.5, jnp.log1p(jnp.where(jnp.abs(s) < 0.5, s, 0)), direct)
    g = tau - c  # log(softmax(theta_1) / softmax(theta_0)), entry by entry
    near = jnp.abs(g) < 1
    diff = jnp.where(near, sb * jnp.expm1(jnp.where(near, g, 0)), jax.nn.softmax(base + tau, axis=-1) - sb)
    q = sb + eps
    kl = jnp.sum(q * _phi(diff / q), axis=-1, keepdims=True)
    return jnp.abs(tau) * kl


def arcee_fusion(
    deltas: jax.Array, weights: Floats = 1.0, *, base: jax.Array | None = None, name: str | None = None
) -> jax.Array:
    """`tau * [importance >= median + 1.5 (q3 - q1)]` for the one other model.

    Quantiles are `sorted[int(q (n - 1))]` over all entries. mergekit estimates
    them from a random (unseeded) sample of 10^6 entries when a tensor has more,
    so its result for such tensors varies from run to run; this one is exact
    and deterministic (for up to 10^6 entries the two agree). deltas `[1, ...]`.
    """
    where = _checks.where(name)
    guard = _checks.Guard()
    x = one_model_stack(deltas, weights, "arcee_fusion", name, guard)
    if base is None:
        raise ValueError(f"arcee_fusion compares the models' softmax rows and needs base=theta_0{where}")
    tau = x[0].astype(_checks.work_dtype(x.dtype))
    b = _checks.as_array(base, "base")
    if tuple(b.shape) != tuple(tau.shape):
        raise ValueError(f"base has shape {tuple(b.shape)} but the task vector {tuple(tau.shape)}{where}")
    if tau.size == 0:
        return tau
    scores = importance(
        tau.reshape((1,) if tau.ndim == 0 else tau.shape),
        b.astype(tau.dtype).reshape((1,) if tau.ndim == 0 else tau.shape),
    ).reshape(tau.shape)
    s = jnp.sort(scores.reshape(-1))
    median, q1, q3 = _quantile(s, 0.5), _quantile(s, 0.25), _quantile(s, 0.75)
    threshold = median + 1.5 * (q3 - q1)
    return guard.apply(jnp.where(scores >= threshold, tau, 0))
