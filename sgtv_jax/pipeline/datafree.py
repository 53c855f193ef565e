"""The data-free merge of any checkpoint: tensor by tensor, by name, with no model of the architecture.

    plan = plan_by_name(headers of base and models)     (byname.py: what each output tensor is)
    for each output tensor, in the base's order:
        merge: read it from the base and every model (one tensor in memory at a time)
               -> merge_entry -> plan_tensor (planning.py) -> merge_planned (sgtv_jax.merge.plan)
        base / copy: the stored tensor of the base / of the model named
    atomic HF export (convert.export.export_hf): config.json from the base (untied
    head if the plan says so), tokenizer files, model card, merge_report.json

`merge_entry` is the one place a tensor is read and merged. Every tensor whose
method and trim merge entry by entry (`why_not_streamed` is None) is merged by
`sgtv_jax.merge.streaming.merge_rows`' compiled program, whatever its size or
source: a tensor whose whole-tensor merge would need more working memory than
`memory_budget` (`whole_tensor_bytes`: `T + 1` float32 copies and the merge's
temporaries) in row chunks that fit it (reading stored rows through
`TensorInputs.read_rows`), any other in one chunk. Every chunking gives the
same bits, and so does every input format (a `.bin` or LoRA-applied model is
read whole, a safetensors one by rows); against the library's op-by-op
`merge_planned`, selections are identical and weighted sums agree to float32
rounding (XLA fuses a multiply into its add). One compiled program per chunk
shape and plan replaces a dozen dispatched ops per tensor: measured on 1B
shapes, the 2-D tensors under the budget took 32 s of a 134 s merge op by op.
With `tensors(chunked=True)` a chunked output (and every large base / copied
tensor) reaches the writer as a `convert.chunked.ChunkedTensor`, chunk by
chunk, so no whole tensor is held. Methods that need whole tensors, and
tensors over the budget that are vectors or that a checkpoint reads only whole
(a LoRA-applied model), are merged whole by `merge_planned`; the run's report
lists the latter under `not_streamed`.

`sgtv merge` writes the output while the merge runs ahead
(`export_run.export`: `convert.chunked.ahead` runs `tensor_chunks()` in a
worker thread): reading and merging tensor i + 1 overlap writing tensor i,
with at most `AHEAD_ITEMS` finished outputs (row chunks or whole tensors)
waiting; the bytes are those of the sequential run, and an error in the
worker stops the merge where it would have stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from convert.architectures import SUPPORTED_MODEL_TYPES
from convert.chunked import ChunkedTensor, rows_of
from convert.conversion import source_dtype
from convert.dtypes import parse_dtype
from sgtv_jax.merge.plan import TensorPlan, merge_planned
from sgtv_jax.merge.specs import method_spec
from sgtv_jax.merge.streaming import StreamStats, bytes_per_entry, merge_rows, why_not_streamed
from sgtv_jax.pipeline.byname import BASE, COPY, MERGE, NamePlan, TensorEntry, plan_by_name
from sgtv_jax.pipeline.checkpoints import Checkpoints
from sgtv_jax.pipeline.config import ConfigError, MergeConfig
from sgtv_jax.pipeline.driver import merged_record, task_vectors, translated, unchanged, unchanged_record
from sgtv_jax.pipeline.planning import plan_tensor
from sgtv_jax.pipeline.report import LayerRecord, StageTimer, jsonable, kept_densities, peak_rss_mb, with_export_time

MERGE_PATH = "by_name"


class TensorInputs(NamedTuple):
    """Readers of one output tensor's inputs; model `m` is 0 for the base, `t + 1` for fine-tuned model t.

    read(m): the whole stored tensor; read_rows(m, r0, r1): its stored rows
    `[r0, r1)` (first axis), NaN/Inf-checked like `read`; rows: whether every
    source reads rows without the rest of the tensor (else `read_rows` reads it whole).
    """

    read: Callable[[int], np.ndarray]
    read_rows: Callable[[int, int, int], np.ndarray]
    rows: bool = True


@dataclasses.dataclass
class StreamLog:
    """Which tensors over the memory budget were merged in row chunks (name -> chunks) and which
    were merged whole anyway (name, why)."""

    chunks: dict[str, int] = dataclasses.field(default_factory=dict)
    whole: list[dict[str, str]] = dataclasses.field(default_factory=list)


def whole_tensor_bytes(shape: tuple[int, ...], tasks: int) -> int:
    """Working memory of merging a tensor of `shape` whole, for `tasks` models (bytes, an estimate).

    `math.prod(shape) * streaming.bytes_per_entry(tasks)`: the float32 base,
    task vectors and trimmed vectors, the merge's temporaries and the output.
    """
    return math.prod(shape) * bytes_per_entry(tasks)


def streaming_refusal(
    plan: TensorPlan, shape: tuple[int, ...], inputs: TensorInputs, *, over_budget: bool = True
) -> str | None:
    """Why a tensor is merged whole by `merge_planned` op by op (None: by `merge_rows`' compiled program).

    A tensor within the budget is one chunk, read whole whatever its source;
    one over it is chunked only when every source reads rows alone.
    """
    if len(shape) < 2 and over_budget:
        return "a vector has one row"
    if over_budget and not inputs.rows:
        return "a checkpoint reads this tensor only whole (e.g. a LoRA-applied model)"
    return why_not_streamed(plan)


def checkpoint_inputs(ckpts: Checkpoints, sources: tuple[str, ...]) -> TensorInputs:
    """Readers of one tensor of open checkpoints: `sources[0]` of the base, `sources[t + 1]` of model t."""
    every = [ckpts.base] + ckpts.models
    return TensorInputs(
        read=lambda m: ckpts.get(every[m], sources[m]),
        read_rows=lambda m, r0, r1: ckpts.get_rows(every[m], sources[m], r0, r1),
        rows=all(hasattr(c, "get_rows") for c in every),
    )


def plan_checkpoints(ckpts: Checkpoints) -> NamePlan:
    """The `NamePlan` of open checkpoints, messages naming each model as the YAML wrote it."""
    return plan_by_name(
        ckpts.base, ckpts.models, base_label=ckpts.label(ckpts.base), labels=[ckpts.label(m) for m in ckpts.models]
    )


def merge_entry(
    cfg: MergeConfig,
    entry: TensorEntry,
    inputs: TensorInputs,
    out_dtype: np.dtype,
    timer: StageTimer,
    *,
    chunked: bool = False,
    log: StreamLog | None = None,
) -> tuple[np.ndarray | ChunkedTensor, LayerRecord]:
    """Merge one `merge` entry; returns (the output tensor in `out_dtype`, stored layout; its report row).

    The task vectors `[T, ...]` are `model_t - base` in float32, swapped to
    `[T, cols, rows]` when `entry.transpose`; the result is `base +
    merge_planned(plan)`, or the base itself when no model changed the tensor.
    A tensor whose `whole_tensor_bytes` exceed `cfg.memory_budget` is merged
    in row chunks (`merge_rows`): returned as a `ChunkedTensor`
    when `chunked` (its report row is complete once its chunks are read),
    else joined. `log` records which tensors were merged in chunks and which
    over-budget ones were merged whole anyway (and why).
    """
    tasks = len(entry.sources) - 1
    plan = plan_tensor(cfg, entry.name, entry.block, entry.depth, linear=False)
    if entry.transpose and method_spec(plan.method).stored_layout:
        entry = dataclasses.replace(entry, transpose=False)  # its axes mean what mergekit reads: rows as stored
    over = whole_tensor_bytes(entry.shape, tasks) > cfg.memory_budget
    why = streaming_refusal(plan, entry.shape, inputs, over_budget=over)
    if why is None:
        streamed, rec = _merge_streamed(cfg, entry, plan, inputs, out_dtype, timer, log if over else None)
        return (streamed if chunked else np.concatenate(list(streamed))), rec
    if over and log is not None:
        log.whole.append({"name": entry.name, "why": why})
    t0 = time.perf_counter()
    with timer("load"):
        b = np.asarray(inputs.read(0), dtype=np.float32)
        deltas = task_vectors(b, lambda t: inputs.read(t + 1), tasks)
    if entry.transpose:
        deltas = jnp.swapaxes(deltas, 1, 2)
    record: dict[str, Any] = dict(
        name=entry.name, block=entry.block, linear=False, shape=tuple(b.shape), density=list(plan.densities)
    )
    with timer("prune"):
        same = unchanged(plan, deltas)
        if not same:
            merged, trimmed, info = _merge_planned(plan, deltas, b.T if entry.transpose else b)
    if same:  # the base tensor is the result (`driver.unchanged`)
        return b.astype(out_dtype), unchanged_record(record, tasks, t0)
    with timer("merge"):
        kept = [float(k) for k in np.asarray(kept_densities(trimmed))]
        if entry.transpose:
            merged = merged.T
        out = np.asarray(b + np.asarray(merged, np.float32)).astype(out_dtype)
    return out, merged_record(record, info, kept, t0)


def _merge_streamed(
    cfg: MergeConfig,
    entry: TensorEntry,
    plan: TensorPlan,
    inputs: TensorInputs,
    out_dtype: np.dtype,
    timer: StageTimer,
    log: StreamLog | None,
) -> tuple[ChunkedTensor, LayerRecord]:
    """`merge_entry` in row chunks of at most `cfg.memory_budget` working memory (lazy: the chunks
    are merged as they are read; the report row is filled in after the last)."""
    t0 = time.perf_counter()
    tasks = len(entry.sources) - 1
    record = LayerRecord(
        entry.name, entry.block, False, tuple(entry.shape), None, list(plan.densities), [], None, None, None, 0.0
    )
    stats = StreamStats()
    with translated(plan):
        chunks = merge_rows(
            plan,
            functools.partial(inputs.read_rows, 0),
            [functools.partial(inputs.read_rows, t + 1) for t in range(tasks)],
            entry.shape,
            out_dtype=out_dtype,
            budget_bytes=cfg.memory_budget,
            transpose=entry.transpose,
            stats=stats,
        )

    def merged() -> Iterator[np.ndarray]:
        while True:
            with timer("merge"), translated(plan):
                chunk = next(chunks, None)
            if chunk is None:
                break
            yield chunk
        record.trim = "unchanged" if stats.unchanged else stats.trim
        record.kept_density = list(stats.kept)
        record.time_s = time.perf_counter() - t0
        if log is not None:
            log.chunks[entry.name] = stats.chunks

    return ChunkedTensor(tuple(entry.shape), out_dtype, merged()), record


def _merge_planned(plan: TensorPlan, deltas: jax.Array, base: np.ndarray) -> tuple[jax.Array, jax.Array, Any]:
    with translated(plan):
        merged, trimmed, info = merge_planned(plan, deltas, None, base=jnp.asarray(base))
    return jax.block_until_ready(merged), trimmed, info


class DataFreeRun:
    """One data-free merge by tensor name (module doc). `tensors()` drives it; then `report()`.

    Args:
      cfg: a validated `MergeConfig` that needs no calibration data.
      progress: show a tqdm bar over the tensors.
      ckpts, plan: checkpoints already open and their plan (default: open `cfg`'s, plan by name).
    """

    def __init__(
        self,
        cfg: MergeConfig,
        *,
        progress: bool = True,
        ckpts: Checkpoints | None = None,
        plan: NamePlan | None = None,
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        self.timer = StageTimer()
        with self.timer("load"):
            self.ckpts = ckpts if ckpts is not None else Checkpoints(cfg)
            self.plan = plan if plan is not None else plan_checkpoints(self.ckpts)
            self.out_dtype_name = cfg.dtype or source_dtype(self.ckpts.base)
            self.out_dtype = parse_dtype(self.out_dtype_name)
        self.T = len(cfg.models)
        self.records: list[LayerRecord] = []
        self.log = StreamLog()

    @property
    def base(self) -> Any:
        return self.ckpts.base

    def inputs(self, entry: TensorEntry) -> TensorInputs:
        """Readers of `entry`'s sources: the base (0) and each fine-tuned model (t + 1)."""
        return checkpoint_inputs(self.ckpts, entry.sources)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """The output, tensor by tensor in the base's order (lazy: drives the whole merge); whole arrays."""
        return cast(Iterator[tuple[str, np.ndarray]], self._tensors(chunked=False))

    def tensor_chunks(self) -> Iterator[tuple[str, np.ndarray | ChunkedTensor]]:
        """`tensors`, but tensors merged in row chunks and base / copied tensors larger than the
        memory budget come as `ChunkedTensor`s (read each before asking for the next)."""
        return self._tensors(chunked=True)

    def _tensors(self, *, chunked: bool) -> Iterator[tuple[str, np.ndarray | ChunkedTensor]]:
        for entry in tqdm(self.plan.entries, desc="merge", unit="tensor", disable=not self.progress):
            if entry.action == MERGE:
                out, rec = merge_entry(
                    self.cfg,
                    entry,
                    self.inputs(entry),
                    self.out_dtype,
                    self.timer,
                    chunked=chunked,
                    log=self.log,
                )
                self.records.append(rec)
                yield entry.name, out
                continue
            t0 = time.perf_counter()
            src = self.ckpts.base if entry.action == BASE else self.ckpts.models[entry.source]
            arr: np.ndarray | ChunkedTensor
            if chunked and self._copy_in_rows(src, entry.name):
                arr = self._rows_of(src, entry.name)
            else:
                with self.timer("load"):
                    arr = self.ckpts.get(src, entry.name)
            self.records.append(
                LayerRecord(
                    entry.name,
                    entry.block,
                    False,
                    tuple(arr.shape),
                    "base" if entry.action == BASE else f"copy models[{entry.source}]",
                    [],
                    [],
                    None,
                    None,
                    None,
                    time.perf_counter() - t0,
                )
            )
            yield entry.name, arr

    def _copy_in_rows(self, src: Any, name: str) -> bool:
        """Whether a base / copied tensor is passed on in row chunks: larger than the budget, rows readable."""
        shape = tuple(src.shape(name))
        return (
            len(shape) >= 1
            and hasattr(src, "get_rows")
            and math.prod(shape) * src.dtype(name).itemsize > self.cfg.memory_budget
        )

    def _rows_of(self, src: Any, name: str) -> ChunkedTensor:
        """Tensor `name` of `src` as row chunks of at most the memory budget (NaN/Inf-checked)."""
        shape = tuple(src.shape(name))
        row_bytes = max(math.prod(shape[1:]) * src.dtype(name).itemsize, 1)
        step = max(1, self.cfg.memory_budget // row_bytes)

        def read(r0: int, r1: int) -> np.ndarray:
            with self.timer("load"):
                return self.ckpts.get_rows(src, name, r0, r1)

        return rows_of(read, shape, src.dtype(name), step)

    def report(self, wall_s: float) -> dict[str, Any]:
        """The JSON report: config, stage times, peak RSS, the rules applied, one row per output tensor."""
        unused = any(self.cfg.calibration_for(t) is not None for t in range(self.T))
        rep = {
            "config": jsonable(self.cfg.to_dict()),
            "merge_path": MERGE_PATH,
            "model_type": self.plan.model_type,
            "num_layers": self.plan.num_layers,
            "stacks": dict(self.plan.depths),
            "hessian_source": self.cfg.hessian_source,
            "calibration_tokens": 0,
            "calibration_unused": unused,
            "output_dtype": self.out_dtype_name,
            "tie_word_embeddings": self.plan.config.get("tie_word_embeddings"),
            "tensor_rules": [jsonable(r) for r in self.plan.rules],
            "wall_s": wall_s,
            "stages_s": dict(self.timer.stages),
            "peak_rss_mb": peak_rss_mb(),
            "memory_budget": self.cfg.memory_budget,
            "streamed_chunks": dict(self.log.chunks),
            "not_streamed": list(self.log.whole),
            "layers": [jsonable(dataclasses.asdict(r)) for r in self.records],
        }
        return with_export_time(rep, wall_s)

    def orbax_refusal(self) -> str | None:
        """Why this merge cannot be written as Orbax (None: it can)."""

        mt = self.plan.model_type
        if mt not in SUPPORTED_MODEL_TYPES:
            return (
                f"--format orbax holds a Flax model, and architecture {mt!r} has no Flax family here "
                f"(those with one: {', '.join(SUPPORTED_MODEL_TYPES)}); use --format hf"
            )
        if self.plan.config != dict(self.base.config) or any(e.action == COPY for e in self.plan.entries):
            return (
                "--format orbax holds the base architecture's parameters, but this merge changes them "
                "(an untied head or tensors the base lacks, see `sgtv check`); use --format hf"
            )
        return None

    def close(self) -> None:
        self.ckpts.close()


def uses_by_name(cfg: MergeConfig, model_type: str) -> bool:
    """Whether `cfg` merges by tensor name (`DataFreeRun`) rather than block by block (`MergeRun`).

    By name: no tensor needs calibration data, and either no calibration data
    is configured or the architecture has no Flax family here (calibration data
    given to a data-free merge of a registered architecture still measures the
    block merge's reconstruction errors).
    """

    if cfg.needs_calibration():
        return False
    calibrated = any(cfg.calibration_for(t) is not None for t in range(len(cfg.models)))
    return not calibrated or model_type not in SUPPORTED_MODEL_TYPES


def require_flax_family(cfg: MergeConfig, model_type: str) -> None:
    """`ConfigError` naming the architecture when a merge that needs calibration data has no Flax family."""

    if model_type in SUPPORTED_MODEL_TYPES:
        return
    spec = cfg.method_spec
    if spec.learns_weights:
        raise ConfigError(
            f"base_model: merge_method {cfg.merge_method!r} learns its coefficients by running the merged model "
            f"on the calibration data, and architecture {model_type!r} has no Flax family here (those with one: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}). Use a data-free method (e.g. task_arithmetic or ties): "
            "data-free merges work on any architecture"
        )
    what = f"merge_method {cfg.merge_method!r} (Gram matrices)" if spec.needs_grams else f"trim {cfg.trim!r}"
    raise ConfigError(
        f"base_model: {what} needs calibration data run through a model of the architecture, and "
        f"architecture {model_type!r} has no Flax family here (those with one: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}). Use a data-free trim (magnitude, random, magprune, breadcrumbs) "
        "and a method without Grams: data-free merges work on any architecture"
    )
