"""Where block i's Hessians come from (`hessian_source`): one small strategy class per source.

Every source runs calibration windows (`datasets`) from some embeddings
(`embedding_tensors`) through some blocks (`block_states`), and after block i
is merged decides how its streams move on (`advance`, `after_block`):

| source     | streams (data)          | block i's linear inputs come from             | H            |
| ---------- | ----------------------- | --------------------------------------------- | ------------ |
| `base`     | one (shared)            | the base model                                | `[in, in]`   |
| `per_task` | one per fine-tune (own) | fine-tune t's own model                       | `[T, in, in]`|
| `merged`   | one (shared)            | the merged-so-far model (merged blocks < i,   | `[in, in]`   |
|            |                         | merged embeddings, base block i)              |              |
| `per_task_merged` | one per fine-tune (own) | the merged-so-far model, as `merged`  | `[T, in, in]`|

A routed expert's tokens are weighted by the routing weights of the same
block run that captures its inputs (`streams.capture`), so each source
weights experts as its own model routes: `base` by the base router,
`per_task` by fine-tune t's, `merged` by base block i's router on the
merged-so-far hidden states.

`per_task_merged` is RegMean++'s idea: each task's own data, seen by the
merged-so-far model, so block i's merge fits the inputs it will really get
from the merged blocks below it, task by task.

Only the Grams the merge reads are accumulated (`hessians`' `skip`): a linear
layer no model changed merges to the base whatever its H (`driver.untouched_linear`),
so its input group gets no Gram, and a block with no group left only moves its
streams on (`passes_through`: the block forward, no capture). Fine-tunes that
train the top blocks pay the Grams of those blocks alone.

A model without calibration data (allowed for `per_task` / `per_task_merged`
when the fit adds proxy Grams, `proxy_gram > 0`) has no stream: its
Hessians are zeros with 0 tokens, and the fit uses its proxy Gram alone.

A new source is a subclass overriding these few methods (`per_task_merged`:
`datasets` of `PerTaskSource`, `embedding_tensors` / `advance` / `after_block`
of `MergedSource`, stacked Hessians); then one entry in `SOURCES` (and in
`config.HESSIAN_SOURCES`).

Every source runs on a device mesh (`sgtv_jax.pipeline.mesh`): its streams
are split over the mesh's `data` axis, block states are copied to every
device, and the Hessians it returns are arrays of this process's first
device (the same on every process).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sgtv_jax.pipeline.arch import Arch
from sgtv_jax.pipeline.calib_rate import block_flops, calibrate_summary, matmul_gflops
from sgtv_jax.pipeline.checkpoints import Checkpoints
from sgtv_jax.pipeline.config import CalibrationConfig, MergeConfig
from sgtv_jax.pipeline.mesh import make_mesh, replicate, to_local
from sgtv_jax.pipeline.streams import Stream, capture, embed_stream, propagate

Tensors = dict[str, np.ndarray]


class BlockHessians(NamedTuple):
    """Block i's Hessians and, per stream (one, or one per task for `per_task`), what went into them."""

    hessians: dict[str, jax.Array]  # linear layer (HF-local) -> [in, in] or [T, in, in]
    tokens: dict[str, list[int]]  # real tokens in each stream's H (a routed expert: routed to it)
    fallback: dict[str, list[bool]]  # an expert given too few tokens used the all-token H


def _f32(tensors: Tensors) -> Tensors:
    return {n: np.asarray(a, dtype=np.float32) for n, a in tensors.items()}


class HessianSource:
    """The `base` source; the others override what differs. Holds the calibration `streams`."""

    stacked = False  # one H per fine-tuned model, stacked `[T, in, in]`
    propagates = False  # streams move on through the merged block (`after_block`), not the captured one

    def __init__(
        self,
        arch: Arch,
        batch_size: int,
        min_routed_tokens: int | None = None,
        mesh: Mesh | None = None,
        accumulation: str = "float32",
    ) -> None:
        self.arch = arch
        self.batch_size = batch_size
        self.min_routed_tokens = min_routed_tokens  # experts given fewer fall back (streams.capture)
        self.mesh = mesh if mesh is not None else make_mesh(1)
        self.accumulation = accumulation  # streams.HessianSum
        self.streams: list[Stream | None] = []  # None: a model without calibration data (zero Hessians)
        self.flops = [0, 0]  # forward, Hessian FLOPs of the blocks so far (`calib_rate`)

    def state(self, i: int, tensors: Tensors) -> Any:
        """Block i's state from HF-named tensors, on every device of the mesh."""
        return replicate(self.mesh, self.arch.block_state(i, tensors))

    def datasets(self, cfg: MergeConfig) -> list[CalibrationConfig | None]:
        """The calibration data of each stream: the shared one."""
        return [cfg.calibration or cfg.calibration_for(0)]

    def embedding_tensors(self, ckpts: Checkpoints, outer: list[str], merged: Tensors) -> list[Tensors]:
        """The non-block tensors each stream is embedded with (`merged`: the merged ones)."""
        return [ckpts.read_base(outer)]

    def start(self, sets: list[Any], embeddings: list[Tensors]) -> None:
        """Embed every calibration set (`CalibrationSet`, None: no data) with its stream's tensors."""
        self.streams = [
            None if c is None else embed_stream(self.arch, e, c, self.batch_size, self.mesh, self.accumulation)
            for e, c in zip(embeddings, sets)
        ]

    def block_states(self, i: int, base: Tensors, fts: list[Tensors]) -> list[Any]:
        """The block-i states whose linear inputs are captured, one per stream."""
        return [self.state(i, base)]

    def hessians(self, i: int, base: Tensors, fts: list[Tensors], skip: Collection[str] = ()) -> BlockHessians:
        """H of block i's linear layers (HF-local name -> `[in, in]` or `[T, in, in]`), token counts.

        skip: HF-local linear layers whose H the merge does not read. An input group all of
        whose layers are skipped accumulates no Gram; with no group left, the streams only
        move on through the block (`passes_through`).
        """
        groups = [g for g in self.arch.require_input_groups() if not set(g.names) <= set(skip)]
        if not groups:
            self.passes_through(i, base, fts)
            return BlockHessians({}, {}, {})
        got: list[Any] = []
        for state, stream in zip(self.block_states(i, base, fts), self.streams):
            if stream is None:
                got.append(None)
                continue
            cap = capture(self.arch, i, state, stream, groups, self.min_routed_tokens)
            got.append(cap._replace(hessians={n: to_local(h) for n, h in cap.hessians.items()}))
            self.advance(stream, cap.outputs)
        seen = next(p for p in got if p is not None)  # config checks: some model has data
        blank = (  # a model without data: zero Hessians, 0 tokens
            {n: jnp.zeros_like(h) for n, h in seen.hessians.items()},
            {n: 0 for n in seen.hessians},
            {n: False for n in seen.hessians},
        )
        per = [seen._replace(hessians=blank[0], tokens=blank[1], fallback=blank[2]) if p is None else p for p in got]
        names = per[0].hessians
        self._count(i, base, names)
        hess = {n: jnp.stack([p.hessians[n] for p in per]) for n in names} if self.stacked else dict(per[0].hessians)
        return BlockHessians(
            hess, {n: [p.tokens[n] for p in per] for n in names}, {n: [p.fallback[n] for p in per] for n in names}
        )

    def advance(self, stream: Stream, outs: list[jax.Array]) -> None:
        """After capture: the stream moves on through the block it was captured in."""
        stream.hidden = outs

    def passes_through(self, i: int, base: Tensors, fts: list[Tensors]) -> None:
        """Block i needs no H: each stream moves on through its block state without capture
        (a merged source moves on in `after_block`, through the merged block)."""
        if not self.propagates:
            for state, stream in zip(self.block_states(i, base, fts), self.streams):
                if stream is not None:
                    self.advance(stream, propagate(self.arch, i, state, stream))
        self._count(i, base, {})

    def _count(self, i: int, base: Tensors, hessians: Mapping[str, jax.Array]) -> None:
        """Add block i's calibration FLOPs (`calib_rate.block_flops`: a forward through every linear
        layer, the Grams of those in `hessians`) to `flops`."""
        prefix = self.arch.prefix(i)
        groups = self.arch.require_input_groups()
        linear = {
            n: (base[f"{prefix}{n}.weight"].size, hessians[n].shape[-1] if n in hessians else 0)
            for g in groups
            for n in g.names
        }
        got = block_flops(
            linear, [g for g in groups if g.names[0] in hessians], self.token_positions(), self.propagates
        )
        self.flops = [a + b for a, b in zip(self.flops, got)]

    def summary(self, seconds: float) -> dict[str, Any]:
        """The report's `"calibrate"` entry for a stage of `seconds` (times a small matmul now)."""
        forward, hessian = self.flops
        return calibrate_summary(forward, hessian, self.token_positions(), seconds, matmul_gflops())

    def token_positions(self) -> int:
        """Token positions one pass over all streams runs (real windows x sequence length)."""
        return sum(sum(s.rows) * s.hidden[0].shape[1] for s in self.streams if s is not None)

    def after_block(self, i: int, merged: Tensors) -> None:
        """Block i is merged (`merged`: its HF-named tensors in the output dtype)."""


class BaseSource(HessianSource):
    """Calibration data through the base model."""


class PerTaskSource(HessianSource):
    """Each fine-tune's own data through its own model: one H per task."""

    stacked = True

    def datasets(self, cfg: MergeConfig) -> list[CalibrationConfig | None]:
        return [cfg.calibration_for(t) for t in range(len(cfg.models))]

    def embedding_tensors(self, ckpts: Checkpoints, outer: list[str], merged: Tensors) -> list[Tensors]:
        return ckpts.read_models(outer)

    def block_states(self, i: int, base: Tensors, fts: list[Tensors]) -> list[Any]:
        return [self.state(i, f) for f in fts]


class MergedSource(HessianSource):
    """Calibration data through the merged-so-far model (merged embeddings and blocks < i)."""

    propagates = True

    def embedding_tensors(self, ckpts: Checkpoints, outer: list[str], merged: Tensors) -> list[Tensors]:
        return [_f32({n: merged[n] for n in outer})]

    def advance(self, stream: Stream, outs: list[jax.Array]) -> None:
        pass  # block i's output must come from the merged block, known only after the merge

    def after_block(self, i: int, merged: Tensors) -> None:
        state = self.state(i, _f32(merged))
        for stream in self.streams:
            if stream is not None:
                stream.hidden = propagate(self.arch, i, state, stream)
                jax.block_until_ready(stream.hidden)


class PerTaskMergedSource(MergedSource):
    """Each fine-tune's own data through the merged-so-far model: one H per task (RegMean++)."""

    stacked = True

    def datasets(self, cfg: MergeConfig) -> list[CalibrationConfig | None]:
        return [cfg.calibration_for(t) for t in range(len(cfg.models))]

    def embedding_tensors(self, ckpts: Checkpoints, outer: list[str], merged: Tensors) -> list[Tensors]:
        shared = _f32({n: merged[n] for n in outer})
        return [shared] * len(ckpts.models)

    def block_states(self, i: int, base: Tensors, fts: list[Tensors]) -> list[Any]:
        state = self.state(i, base)  # base block i, as `merged` (on every device); one per task's stream
        return [state] * len(self.streams)


SOURCES: dict[str, Callable[..., HessianSource]] = {
    "base": BaseSource,
    "per_task": PerTaskSource,
    "merged": MergedSource,
    "per_task_merged": PerTaskMergedSource,
}


def make_source(
    name: str,
    arch: Arch,
    batch_size: int,
    min_routed_tokens: int | None = None,
    mesh: Mesh | None = None,
    accumulation: str = "float32",
) -> HessianSource:
    """The source called `name` (one of `config.HESSIAN_SOURCES`) on `mesh` (None: one device).

    `min_routed_tokens`: `streams.capture`; `accumulation`: `streams.HessianSum`.
    """
    return SOURCES[name](arch, batch_size, min_routed_tokens, mesh, accumulation)
