"""Calibration hidden states flowing block by block, and the Hessians they give each linear layer.

A `Stream` holds one calibration set's hidden states in micro-batches. It
starts at a model's embeddings (`embed_stream`); `capture` runs one block over
it, accumulating `H = (2/N) sum x x^T` of every linear layer's input (N
sequences; padding masked; one H per input group) and returning the block's
outputs; `propagate` only returns the outputs.

Routed experts (input groups with token weights, `sgtv_jax.models.groups`):
each token's `x x^T` weighs `r^2`, its routing weight to the expert squared
(0 for tokens routed elsewhere; why `r^2`: `sgtv_jax.models.moe`). An expert
the router sends fewer than `min_routed_tokens` real tokens (default: the
block's hidden size, the fewest with which its gate / up H can have full rank)
falls back to the unweighted H of its own input over every real token,
`(2/N) sum_t x_t x_t^T`, the H it would get as a dense MLP; its three
projections fall back together (they see the same tokens). `Captured.tokens`
and `.fallback` say what each layer got, for the merge report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax.hessian import hessian_finalize, hessian_init, hessian_update
from sgtv_jax.models import apply_block
from sgtv_jax.models.groups import InputGroup
from sgtv_jax.pipeline.arch import Arch


@dataclasses.dataclass
class Stream:
    """Calibration hidden states in micro-batches: h `[b, S, D]`, mask `[b, S]`, block kwargs."""

    hidden: list[jax.Array]
    masks: list[jax.Array]
    kwargs: list[dict[str, Any]]


def embed_stream(arch: Arch, outer: dict[str, np.ndarray], calib: Any, batch_size: int) -> Stream:
    """The embeddings of calibration windows `calib` under the non-block tensors `outer`."""
    model = arch.outer_model(outer)
    hs, ms, kws = [], [], []
    n = calib.input_ids.shape[0]
    for s in range(0, n, batch_size):
        ids = jnp.asarray(calib.input_ids[s : s + batch_size])
        mask = jnp.asarray(calib.mask[s : s + batch_size])
        hs.append(model.embed(ids))
        ms.append(mask)
        kws.append(model.block_kwargs(mask, ids.shape[1], batch=ids.shape[0]))
    return Stream(hs, ms, kws)


class Captured(NamedTuple):
    """One block's capture over one stream."""

    hessians: dict[str, jax.Array]  # linear layer (HF-local) -> H [in, in]
    outputs: list[jax.Array]  # the block's output per micro-batch, [b, S, D]
    tokens: dict[str, int]  # linear layer -> real tokens in its H (a routed expert: those routed to it)
    fallback: dict[str, bool]  # linear layer -> its H is the all-token fallback (experts given too few tokens)


def capture(
    arch: Arch, i: int, state: Any, stream: Stream, groups: Sequence[InputGroup], min_routed_tokens: int | None = None
) -> Captured:
    """Run block i over a stream: Hessian per input group (keyed by each member), outputs, token counts.

    `min_routed_tokens`: the fewest routed tokens a weighted group (an expert)
    needs to keep its routing-weighted H (None: the block's hidden size).
    """
    acc: dict[InputGroup, Any] = {}
    counts: dict[InputGroup, jax.Array] = {}
    outs = []
    for h, m, kw in zip(stream.hidden, stream.masks, stream.kwargs):
        y, caps = apply_block(arch.graphdef(i), state, h, capture=True, **kw)
        real = m.astype(jnp.float32)
        for g in groups:
            x, w = g.inputs(caps)
            w = real if w is None else real * w.astype(jnp.float32)
            if g not in acc:
                acc[g] = hessian_init(x.shape[-1])
                counts[g] = jnp.zeros((), jnp.int32)
            acc[g] = hessian_update(acc[g], x, w)
            counts[g] = counts[g] + jnp.sum(w > 0, dtype=jnp.int32)
        outs.append(y)
    minimum = stream.hidden[0].shape[-1] if min_routed_tokens is None else min_routed_tokens
    tokens = {g: int(c) for g, c in counts.items()}
    low = [g for g in groups if g.weighted and tokens[g] < minimum]
    if low:
        acc.update(_pooled(arch, i, state, stream, low))
    hess, n_tok, fell = {}, {}, {}
    low_set = set(low)
    for g in groups:
        hmat = hessian_finalize(acc[g])
        for n in g.names:
            hess[n], n_tok[n], fell[n] = hmat, tokens[g], g in low_set
    return Captured(hess, outs, n_tok, fell)


def _pooled(arch: Arch, i: int, state: Any, stream: Stream, groups: Sequence[InputGroup]) -> dict[InputGroup, Any]:
    """Unweighted H of each group's input over every real token (a second pass over the stream).

    Groups reading one capture key (every expert's gate / up) share one accumulator.
    """
    acc: dict[str, Any] = {}
    for h, m, kw in zip(stream.hidden, stream.masks, stream.kwargs):
        _, caps = apply_block(arch.graphdef(i), state, h, capture=True, **kw)
        for key in dict.fromkeys(g.input_key for g in groups):
            x = caps[key]
            if key not in acc:
                acc[key] = hessian_init(x.shape[-1])
            acc[key] = hessian_update(acc[key], x, m)
    return {g: acc[g.input_key] for g in groups}


def propagate(arch: Arch, i: int, state: Any, stream: Stream) -> list[jax.Array]:
    """Block i's outputs over a stream (no capture)."""
    return [apply_block(arch.graphdef(i), state, h, capture=False, **kw) for h, kw in zip(stream.hidden, stream.kwargs)]
