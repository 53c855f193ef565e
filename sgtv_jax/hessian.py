"""Layer Hessians `H = (2/n) * sum_tokens x x^T` from calibration inputs.

An optax-style trio of pure functions over a `HessianState`:

    state = hessian_init(cols)
    for x in batches:                     # x: [batch, seq, cols] or [tokens, cols]
        state = hessian_update(state, x, mask)
    h = hessian_finalize(state)           # [cols, cols]

`n` counts calibration *sequences* (the batch dimension; a 2-D input counts as
one), so H is a running mean over sequences exactly as the SparseGPT reference
accumulates it. The scale of H does not change OBS results; it does matter for
comparing Hessians across sources, which is why we keep the reference's.
Padded tokens are excluded by a `[batch, seq]` (or `[tokens]`) mask; a float
mask `w` weights each token: `H = (2/n) * sum_tokens w^2 x x^T` (a routed
expert's tokens scaled by their routing weights, `sgtv_jax.models.moe`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from sgtv_jax import _checks

if TYPE_CHECKING:  # shape annotations for readers and type checkers; never evaluated at run time
    from jaxtyping import Array, Float, Shaped

HIGHEST = jax.lax.Precision.HIGHEST


class HessianState(NamedTuple):
    """Running Hessian of one linear layer's inputs.

    hessian: `[cols, cols]`, `(2/nsamples) * sum x x^T` over the tokens seen so far.
    nsamples: scalar, number of sequences seen.
    """

    hessian: Float[Array, "cols cols"]
    nsamples: Float[Array, ""]


def default_dtype() -> jnp.dtype:
    """float64 when JAX runs with x64 enabled, else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32  # type: ignore[attr-defined]  # dynamic option


def hessian_init(cols: int, dtype: jnp.dtype | None = None) -> HessianState:
    """An empty accumulator for a layer with `cols` input features."""
    if int(cols) <= 0:
        raise ValueError(f"cols must be a positive integer, got {cols!r}")
    dtype = dtype or default_dtype()
    return HessianState(jnp.zeros((cols, cols), dtype), jnp.zeros((), dtype))


@functools.partial(jax.jit, donate_argnums=0)
def _update(state: HessianState, x: Float[Array, "batch seq cols"], mask: Shaped[Array, "batch seq"]) -> HessianState:
    dtype = state.hessian.dtype
    batch = x.shape[0]
    x = x.astype(dtype) * mask.astype(dtype)[..., None]
    x = x.reshape(-1, x.shape[-1])
    n_new = state.nsamples + batch
    # Rescale the old mean before adding, so H never holds an unnormalised sum
    # (keeps float32 accumulation well inside range over many batches).
    xs = jnp.sqrt(2.0 / n_new).astype(dtype) * x
    gram = jnp.matmul(xs.T, xs, precision=HIGHEST)
    hessian = state.hessian * (state.nsamples / n_new) + gram
    return HessianState(hessian, n_new)


def hessian_update(
    state: HessianState, x: Float[Array, "*batch seq cols"], mask: Shaped[Array, "*batch seq"] | None = None
) -> HessianState:
    """Add one batch of layer inputs.

    Args:
      state: the accumulator (donated: do not reuse the argument afterwards).
      x: `[batch, seq, cols]` (batch sequences) or `[tokens, cols]` (one sequence).
      mask: optional `[batch, seq]` / `[tokens]`, nonzero for real tokens; padded
        tokens contribute nothing (the sequence still counts in `nsamples`).
        Float values weight tokens: `x` is scaled by `mask`, so `x x^T` by `mask^2`.
    """
    x = jnp.asarray(x)
    cols = state.hessian.shape[0]
    if x.ndim == 2:
        x = x[None]
        if mask is not None:
            mask = jnp.asarray(mask)[None]
    if x.ndim != 3 or x.shape[-1] != cols:
        raise ValueError(f"x must be [batch, seq, {cols}] or [tokens, {cols}], got shape {tuple(x.shape)}")
    if mask is None:
        mask = jnp.ones(x.shape[:2], dtype=bool)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(x.shape[:2])} to match x, got {tuple(mask.shape)}")
    return _update(state, x, mask)


def hessian_finalize(state: HessianState, *, check: bool = True) -> Float[Array, "cols cols"]:
    """The Hessian `[cols, cols]`; raises if it holds NaN/Inf (bad calibration inputs).

    Under tracing the check is a `checkify` user check (NaN/Inf stay in H).
    """
    if check:
        _checks.Guard().finite(state.hessian, "hessian (from calibration inputs)")
    return state.hessian


def input_norms(hessian: Float[Array, "*tasks cols cols"]) -> Float[Array, "*tasks cols"]:
    """Per-column input norms `[cols]` for Wanda-style scores.

    `sqrt(diag(H) / 2) = sqrt(mean over sequences of sum_tokens x_j^2)`: Wanda's
    `||X_j||_2` up to a constant, which per-row ranking ignores.
    """
    return jnp.sqrt(jnp.maximum(jnp.diagonal(hessian, axis1=-2, axis2=-1), 0) / 2)
