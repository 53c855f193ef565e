"""TIES sign election: which task vectors agree with the elected sign, entry by entry.

Runs on the *weighted, trimmed* task vectors `w_t * tau_t` (mergekit's order;
the PyTorch original elected on unweighted task vectors). After OBS trimming that is after
compensation, so a kept entry that flipped sign votes with its new sign.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgtv_jax.merge.combine import sum_tasks

CONSENSUS = ("sum", "count")


def elect_sign(weighted: jax.Array, method: str = "sum") -> jax.Array:
    """Elected sign `[...]` in {-1, +1} of a stack `[T, ...]`.

    `sum` (TIES, "mass"): `sign(sum_t x_t)`; `count`: `sign(sum_t sign(x_t))`.
    A tie (zero) elects `+1`, as mergekit does.
    """
    if method == "sum":
        total = sum_tasks(weighted)
    elif method == "count":
        total = sum_tasks(jnp.sign(weighted))
    else:
        raise ValueError(f"unknown consensus method {method!r}; known: {', '.join(CONSENSUS)}")
    return jnp.where(total >= 0, 1, -1).astype(weighted.dtype)


def agreement_mask(weighted: jax.Array, elected: jax.Array) -> jax.Array:
    """`[T, ...]` bool: entries whose sign equals the elected sign (zeros never agree)."""
    return jnp.sign(weighted) == elected[None]
