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

On a mesh (`sgtv_jax.pipeline.mesh`) every micro-batch is split over the
`data` axis: a micro-batch holds `ceil(batch_size / D) * D` windows (D
devices), the last one padded with copies of a real window whose Hessian
weight is 0, and each process places only its own rows. Each device keeps
its own partial sum of `x x^T` per input group; the partials are summed once
per layer (`HessianSum.finalize`), in float32 or, with
`hessian_accumulation: float64`, in float64 (see `HessianSum`). One device
with float32 keeps the library's running mean (`sgtv_jax.hessian`) bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sgtv_jax.hessian import HIGHEST, HessianState, hessian_finalize, hessian_init, hessian_update
from sgtv_jax.models import apply_block
from sgtv_jax.models.groups import InputGroup
from sgtv_jax.pipeline.arch import Arch
from sgtv_jax.pipeline.mesh import DATA, global_rows, local_row_range, replicate

ACCUMULATIONS = ("float32", "float64")


@dataclasses.dataclass
class Stream:
    """Calibration hidden states in micro-batches on a mesh.

    hidden `[b, S, D]`; masks `[b, S]`: each token's Hessian weight (0 for
    padding and for the rows that only pad a micro-batch to the mesh);
    kwargs: the block's keyword arrays; rows: the real windows of each
    micro-batch (the sequences its Hessian counts).
    """

    hidden: list[jax.Array]
    masks: list[jax.Array]
    kwargs: list[dict[str, Any]]
    rows: list[int]
    mesh: Mesh
    accumulation: str = "float32"


def micro_batches(n: int, batch_size: int, devices: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, padded size) of each micro-batch of `n` windows over `devices` devices.

    A micro-batch holds `ceil(batch_size / devices) * devices` windows; the
    last is padded up to a multiple of `devices`. One device: `batch_size` windows, no padding.
    """
    step = -(-batch_size // devices) * devices
    for s in range(0, n, step):
        stop = min(s + step, n)
        yield s, stop, -(-(stop - s) // devices) * devices


def embed_stream(
    arch: Arch, outer: dict[str, np.ndarray], calib: Any, batch_size: int, mesh: Mesh, accumulation: str = "float32"
) -> Stream:
    """The embeddings of calibration windows `calib` under the non-block tensors `outer`, sharded over `mesh`.

    Every process computes the embeddings of its own rows only.
    """
    model = arch.outer_model(outer)
    hs, ms, kws, rows = [], [], [], []
    n = calib.input_ids.shape[0]
    for s, stop, size in micro_batches(n, batch_size, mesh.size):
        idx = np.arange(s, s + size)
        real = idx < stop
        idx[~real] = s  # rows padding the micro-batch to the mesh run a real window, weighted 0
        lo, hi = local_row_range(mesh, size)
        ids = jnp.asarray(calib.input_ids[idx[lo:hi]])
        mask = jnp.asarray(calib.mask[idx[lo:hi]])
        b = hi - lo
        hs.append(global_rows(mesh, model.embed(ids)))
        ms.append(global_rows(mesh, np.asarray(mask) * real[lo:hi, None].astype(np.asarray(mask).dtype)))
        kw = model.block_kwargs(mask, ids.shape[1], batch=b)
        kws.append(jax.tree.map(lambda a, b=b: _place(mesh, a, b), kw))
        rows.append(stop - s)
    return Stream(hs, ms, kws, rows, mesh, accumulation)


def _place(mesh: Mesh, a: jax.Array, local_rows: int) -> jax.Array:
    """A block keyword array: split over `data` when it is per row, else the same on every device."""
    if a.ndim >= 1 and a.shape[0] == local_rows and (local_rows > 1 or mesh.size == 1):
        return global_rows(mesh, a)
    return replicate(mesh, a)


class HessianSum:
    """One input group's H over a stream's micro-batches on a mesh.

    One device, float32: the library's running mean (`hessian_update`), bit
    for bit as without a mesh. Otherwise every device adds `x x^T` of its
    rows to its own partial sum (`[D, in, in]`, split over `data`); `finalize`
    sums the D partials once and scales by `2 / n` (n real windows). float64
    partials (`accumulation="float64"`, a local `jax.enable_x64`) make the
    float32 H that OBS reads the correctly rounded sum far more often than
    float32 partials do, whatever the device count; on CPU they cost about
    twice the float32 Gram.
    """

    def __init__(self, cols: int, mesh: Mesh, accumulation: str = "float32") -> None:
        self.mesh = mesh
        self.wide = accumulation == "float64"
        self.running = mesh.size == 1 and not self.wide
        self.n = 0
        if self.running:
            self.state = hessian_init(cols)
        else:
            with jax.enable_x64(self.wide):
                dtype = jnp.float64 if self.wide else jnp.float32
                self.part = jax.make_array_from_callback(
                    (mesh.size, cols, cols),
                    jax.sharding.NamedSharding(mesh, P(DATA)),
                    lambda idx: np.zeros((1, cols, cols), dtype),
                )

    def update(self, x: jax.Array, w: jax.Array, rows: int) -> None:
        """Add a micro-batch: inputs `x` `[b, S, in]`, token weights `w` `[b, S]`, `rows` real windows."""
        if self.running:
            self.state = hessian_update(self.state, x, w)
            return
        with jax.enable_x64(self.wide):
            self.part = _partial_update(self.mesh)(self.part, x, w)
        self.n += rows

    def finalize(self) -> jax.Array:
        """H `[in, in]` float32, on every device (raises on NaN / Inf like `hessian_finalize`)."""
        if self.running:
            return hessian_finalize(self.state)
        with jax.enable_x64(self.wide):
            h = _reduce(self.mesh)(self.part, jnp.asarray(2.0 / max(self.n, 1), self.part.dtype))
        return hessian_finalize(HessianState(h, jnp.asarray(float(self.n), jnp.float32)))


@functools.cache
def _partial_update(mesh: Mesh) -> Any:
    def local(part: jax.Array, x: jax.Array, w: jax.Array) -> jax.Array:
        dt = part.dtype
        xw = (x.astype(dt) * w.astype(dt)[..., None]).reshape(-1, x.shape[-1])
        return part + jnp.matmul(xw.T, xw, precision=HIGHEST)[None]

    return jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(DATA), P(DATA), P(DATA)), out_specs=P(DATA)), donate_argnums=0
    )


@functools.cache
def _reduce(mesh: Mesh) -> Any:
    # the one cross-device reduction of a layer's H; float32 out, copied to every device
    def total(part: jax.Array, scale: jax.Array) -> jax.Array:
        return (jnp.sum(part, axis=0) * scale).astype(jnp.float32)

    return jax.jit(total, out_shardings=jax.sharding.NamedSharding(mesh, P()))


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
    acc: dict[InputGroup, HessianSum] = {}
    counts: dict[InputGroup, jax.Array] = {}
    outs = []
    for h, m, kw, rows in zip(stream.hidden, stream.masks, stream.kwargs, stream.rows):
        y, caps = apply_block(arch.graphdef(i), state, h, capture=True, **kw)
        real = m.astype(jnp.float32)
        for g in groups:
            x, w = g.inputs(caps)
            w = real if w is None else real * w.astype(jnp.float32)
            if g not in acc:
                acc[g] = HessianSum(x.shape[-1], stream.mesh, stream.accumulation)
                counts[g] = jnp.zeros((), jnp.int32)
            acc[g].update(x, w, rows)
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
        hmat = acc[g].finalize()
        for n in g.names:
            hess[n], n_tok[n], fell[n] = hmat, tokens[g], g in low_set
    return Captured(hess, outs, n_tok, fell)


def _pooled(
    arch: Arch, i: int, state: Any, stream: Stream, groups: Sequence[InputGroup]
) -> dict[InputGroup, HessianSum]:
    """Unweighted H of each group's input over every real token (a second pass over the stream).

    Groups reading one capture key (every expert's gate / up) share one accumulator.
    """
    acc: dict[str, HessianSum] = {}
    for h, m, kw, rows in zip(stream.hidden, stream.masks, stream.kwargs, stream.rows):
        _, caps = apply_block(arch.graphdef(i), state, h, capture=True, **kw)
        for key in dict.fromkeys(g.input_key for g in groups):
            x = caps[key]
            if key not in acc:
                acc[key] = HessianSum(x.shape[-1], stream.mesh, stream.accumulation)
            acc[key].update(x, m, rows)
    return {g: acc[g.input_key] for g in groups}


def propagate(arch: Arch, i: int, state: Any, stream: Stream) -> list[jax.Array]:
    """Block i's outputs over a stream (no capture)."""
    return [apply_block(arch.graphdef(i), state, h, capture=False, **kw) for h, kw in zip(stream.hidden, stream.kwargs)]
