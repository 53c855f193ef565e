"""Calibration hidden states flowing block by block, and the Hessians they give each linear layer.

A `Stream` holds one calibration set's hidden states in micro-batches. It
starts at a model's embeddings (`embed_stream`); `capture` runs one block over
it, accumulating `H = (2/N) sum x x^T` of every linear layer's input (N
sequences; padding masked; one H per input group) and returning the block's
outputs; `propagate` only returns the outputs. With float32 accumulation (the
default) a micro-batch's capture is one jitted program (`_capture_step`: the
block forward, every group's Gram added to its donated running total, token
counts), so the captured inputs never leave it and the host waits once per
block; the Hessians equal the per-group dispatch's (`_accumulate`) bit for bit.

Routed experts (input groups with token weights, `sgtv_jax.models.groups`):
each token's `x x^T` weighs `r^2`, its routing weight to the expert squared
(0 for tokens routed elsewhere; why `r^2`: `sgtv_jax.models.moe`). An expert
the router sends fewer than `min_routed_tokens` real tokens (default: the
block's hidden size, the fewest with which its gate / up H can have full rank)
falls back to the unweighted H of its own input over every real token,
`(2/N) sum_t x_t x_t^T`, the H it would get as a dense MLP; its three
projections fall back together (they see the same tokens). `Captured.tokens`
and `.fallback` say what each layer got, for the merge report.

On a mesh (`sgtv_jax.pipeline.mesh`) every device holds `batch_size`
windows (at most the set's count) of each micro-batch (D times that on D devices, the last
micro-batch padded with copies of a real window whose Hessian weight is 0),
and each process places only its own rows. The result does not depend on the
mesh, bit for bit (`HessianSum`): a device runs exactly the shapes one device
would (XLA's CPU matmuls round a row differently when the batch around it has
another size), and the chunk Grams are summed in window order.
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

from sgtv_jax.hessian import HIGHEST, HessianState, hessian_finalize
from sgtv_jax.models import apply_block
from sgtv_jax.models.groups import InputGroup
from sgtv_jax.pipeline.arch import Arch
from sgtv_jax.pipeline.mesh import DATA, global_rows, local_row_range, replicate, replicated

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

    A micro-batch holds `min(batch_size, n)` windows per device, the last one
    padded to that size too: every device always runs the shapes of a
    one-device run, so a window's activations do not depend on the mesh.
    """
    step = min(batch_size, n) * devices
    for s in range(0, n, step):
        yield s, min(s + step, n), step


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
    """One input group's H over a stream's micro-batches, the same bit for bit on any mesh.

    Every device computes the Gram `x x^T` of its chunk of `batch_size`
    windows (one fixed-shape matmul); the chunk Grams are added to a running
    total one at a time in window order, and `finalize` scales it by `2 / n`
    (n real windows). Chunks that only pad a micro-batch weigh 0 and add exact
    zeros, so 1, 2 or 8 devices (or processes) give the same H bit for bit.
    The price: every device receives every chunk Gram (an all-gather of
    `[D, in, in]` per micro-batch, where partial sums would reduce once per
    layer). `accumulation="float64"` computes Grams and total in float64 and
    rounds H to float32 once (CPU: about twice the float32 Gram's cost).
    """

    def __init__(self, cols: int, mesh: Mesh, accumulation: str = "float32") -> None:
        self.mesh = mesh
        self.wide = accumulation == "float64"
        self.n = 0
        with jax.enable_x64(self.wide):
            self.total = replicate(mesh, np.zeros((cols, cols), np.float64 if self.wide else np.float32))

    def update(self, x: jax.Array, w: jax.Array, rows: int) -> None:
        """Add a micro-batch: inputs `x` `[b, S, in]`, token weights `w` `[b, S]`, `rows` real windows."""
        with jax.enable_x64(self.wide):
            self.total = _chunk_update(self.mesh)(self.total, x, w)
        self.n += rows

    def finalize(self) -> jax.Array:
        """H `[in, in]` float32, on every device (raises on NaN / Inf like `hessian_finalize`)."""
        with jax.enable_x64(self.wide):
            h = _scale(self.mesh)(self.total, jnp.asarray(2.0 / max(self.n, 1), self.total.dtype))
        return hessian_finalize(HessianState(h, jnp.asarray(float(self.n), jnp.float32)))


def _add_grams(mesh: Mesh, total: jax.Array, x: jax.Array, w: jax.Array) -> jax.Array:
    """`total` plus the Gram of every device's chunk of `x * w`, added in window order (traced)."""
    dt = total.dtype

    def gram(x: jax.Array, w: jax.Array) -> jax.Array:  # one device's chunk
        xw = (x.astype(dt) * w.astype(dt)[..., None]).reshape(-1, x.shape[-1])
        return jnp.matmul(xw.T, xw, precision=HIGHEST)[None]

    grams = jax.shard_map(gram, mesh=mesh, in_specs=(P(DATA), P(DATA)), out_specs=P(DATA))(x, w)
    for d in range(mesh.size):  # window order (device d holds the d-th chunk), never a tree sum
        total = total + grams[d]
    return jax.lax.with_sharding_constraint(total, replicated(mesh))


@functools.cache
def _chunk_update(mesh: Mesh) -> Any:
    return jax.jit(functools.partial(_add_grams, mesh), out_shardings=replicated(mesh), donate_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _capture_step(
    graphdef: Any,
    groups: tuple[InputGroup, ...],
    mesh: Mesh,
    totals: tuple[jax.Array, ...],
    counts: tuple[jax.Array, ...],
    state: Any,
    h: jax.Array,
    m: jax.Array,
    kw: dict[str, Any],
) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """One micro-batch through block i with every group's Gram added: one program, no host round trip.

    totals: float32 `[in, in]` per group (donated); counts: real tokens per group (donated).
    The block output is computed even where the caller drops it (`merged` sources): without
    it XLA fuses the residual into the next norm differently (GPT-2), and H would change bits.
    """
    y, caps = apply_block(graphdef, state, h, capture=True, **kw)
    real = m.astype(jnp.float32)
    new_totals, new_counts = [], []
    for g, total, count in zip(groups, totals, counts):
        x, w = g.inputs(caps)
        w = real if w is None else real * w.astype(jnp.float32)
        new_totals.append(_add_grams(mesh, total, x, w))
        new_counts.append(count + jnp.sum(w > 0, dtype=jnp.int32))
    return y, tuple(new_totals), tuple(new_counts)


@functools.cache
def _scale(mesh: Mesh) -> Any:
    def scaled(total: jax.Array, scale: jax.Array) -> jax.Array:
        return (total * scale).astype(jnp.float32)

    return jax.jit(scaled, out_shardings=replicated(mesh))


class Captured(NamedTuple):
    """One block's capture over one stream."""

    hessians: dict[str, jax.Array]  # linear layer (HF-local) -> H [in, in]
    outputs: list[jax.Array]  # the block's output per micro-batch, [b, S, D]
    tokens: dict[str, int]  # linear layer -> real tokens in its H (a routed expert: those routed to it)
    fallback: dict[str, bool]  # linear layer -> its H is the all-token fallback (experts given too few tokens)


def capture(
    arch: Arch,
    i: int,
    state: Any,
    stream: Stream,
    groups: Sequence[InputGroup],
    min_routed_tokens: int | None = None,
) -> Captured:
    """Run block i over a stream: Hessian per input group (keyed by each member), outputs, token counts.

    `min_routed_tokens`: the fewest routed tokens a weighted group (an expert)
    needs to keep its routing-weighted H (None: the block's hidden size).
    """
    groups = tuple(groups)
    if stream.accumulation == "float32":
        acc, counts, outs = _accumulate_fused(arch, i, state, stream, groups)
    else:
        acc, counts, outs = _accumulate(arch, i, state, stream, groups)
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


Accumulated = tuple[dict[InputGroup, HessianSum], dict[InputGroup, jax.Array], list[jax.Array]]


def _accumulate_fused(arch: Arch, i: int, state: Any, stream: Stream, groups: tuple[InputGroup, ...]) -> Accumulated:
    """float32 Hessians: one `_capture_step` program per micro-batch (forward and Grams together)."""
    graphdef = arch.graphdef(i)
    caps = jax.eval_shape(
        lambda h, kw: apply_block(graphdef, state, h, capture=True, **kw)[1], stream.hidden[0], stream.kwargs[0]
    )
    acc = {g: HessianSum(caps[g.input_key].shape[-1], stream.mesh) for g in groups}
    totals = tuple(acc[g].total for g in groups)
    counts = tuple(jnp.zeros((), jnp.int32) for _ in groups)
    outs = []
    for h, m, kw, rows in zip(stream.hidden, stream.masks, stream.kwargs, stream.rows):
        y, totals, counts = _capture_step(graphdef, groups, stream.mesh, totals, counts, state, h, m, kw)
        outs.append(y)
        for g in groups:
            acc[g].n += rows
    for g, total in zip(groups, totals):
        acc[g].total = total
    return acc, dict(zip(groups, counts)), outs


def _accumulate(arch: Arch, i: int, state: Any, stream: Stream, groups: tuple[InputGroup, ...]) -> Accumulated:
    """Hessians one dispatch per group and micro-batch (float64 accumulation: Grams under x64)."""
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
    return acc, counts, outs


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
