"""Calibration hidden states flowing block by block, and the Hessians they give each linear layer.

A `Stream` holds one calibration set's hidden states in micro-batches. It
starts at a model's embeddings (`embed_stream`); `capture` runs one block over
it, accumulating `H = (2/n) sum x x^T` of every linear layer's input (padding
masked; one H per input group) and returning the block's outputs;
`propagate` only returns the outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax.hessian import hessian_finalize, hessian_init, hessian_update
from sgtv_jax.models import apply_block
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
        ids = jnp.asarray(calib.input_ids[s:s + batch_size])
        mask = jnp.asarray(calib.mask[s:s + batch_size])
        hs.append(model.embed(ids))
        ms.append(mask)
        kws.append(model.block_kwargs(mask, ids.shape[1], batch=ids.shape[0]))
    return Stream(hs, ms, kws)


def capture(arch: Arch, i: int, state: Any, stream: Stream, groups: Sequence[tuple[str, ...]]
            ) -> tuple[dict[str, jax.Array], list[jax.Array]]:
    """Run block i over a stream: Hessian per input group (keyed by each member), outputs."""
    acc: dict[str, Any] = {}
    outs = []
    for h, m, kw in zip(stream.hidden, stream.masks, stream.kwargs):
        y, caps = apply_block(arch.graphdef(i), state, h, capture=True, **kw)
        for g in groups:
            x = caps[g[0]]
            if g[0] not in acc:
                acc[g[0]] = hessian_init(x.shape[-1])
            acc[g[0]] = hessian_update(acc[g[0]], x, m)
        outs.append(y)
    hess = {}
    for g in groups:
        hmat = hessian_finalize(acc[g[0]])
        for n in g:
            hess[n] = hmat
    return hess, outs


def propagate(arch: Arch, i: int, state: Any, stream: Stream) -> list[jax.Array]:
    """Block i's outputs over a stream (no capture)."""
    return [apply_block(arch.graphdef(i), state, h, capture=False, **kw)
            for h, kw in zip(stream.hidden, stream.kwargs)]
