"""Exact row-chunked merge of one tensor whose `[T, ...]` float32 stack exceeds a memory budget.

`merge_rows(plan, base, models, shape, out_dtype=..., budget_bytes=...)`
reads the base and every fine-tuned model through row readers
(`(r0, r1) -> array [r1 - r0, ...]`, e.g. a safetensors slice) and yields the
merged tensor's rows in order, chunk by chunk, in the output dtype:
`(base + merged task vector).astype(out_dtype)`, what
`sgtv_jax.merge.plan.merge_planned` gives on the whole stack of task vectors
`float32(model) - float32(base)`: the same selections (masks, elected signs,
random draws) exactly, and the same bits for every chunking; against
`merge_planned` run op by op, weighted sums may differ by float32 rounding
(the chunk program is compiled, and XLA fuses each multiply into its add:
`tests/test_streaming.py`); and the base itself when no model changed
the tensor and the method maps zero task vectors to zero (the pipeline's
rule, `plan.maps_zero_to_zero`). At most one chunk of every model is in
memory: the working set is `working_set_bytes(shape, T, budget)`, at most
the budget (unless one row exceeds it).

The plan is read once, by `sgtv_jax.merge.call.interpret` (trim, rescale,
count, gamma / epsilon, keys, method keywords); this module executes that
`MergeCall` chunk by chunk, as `plan.run_call` executes it whole. Cut points
over chunks: `sgtv_jax.merge.chunk_select`.

`transpose=True` merges a 2-D tensor as its transpose (the pipeline does so
for 2-D tensors stored in the model's own layout, such as embeddings): the
output keeps the stored layout, but ties, random draws and rows follow the
transposed tensor's row-major order, as `merge_planned` sees it.

How each trim is chunked (chunks are rows of the stored tensor):

| trim          | needs                                   | passes over the rows                   |
| ------------- | --------------------------------------- | -------------------------------------- |
| `magnitude`   | the k-th largest `|d|` per task          | count + merge (+2-3 if a bracket misses) |
| `breadcrumbs` | two cut points per task                 | as magnitude                           |
| `random`      | the whole tensor's Bernoulli mask       | merge (each chunk draws its own part)  |
| `magprune`    | per-row ranks and uniforms              | merge (whole rows per chunk)           |
| none          | -                                       | merge                                  |

Thresholds: `|d|` as float32 bit patterns, reversed (`0x7FFFFFFF - bits`)
so the k largest are the k smallest keys. A sample of whole rows (read row
by row, `SAMPLE_ROWS` at least) brackets the k-th key (6 sigma, widened by
the spread between rows); one counting pass counts the keys below the
bracket and gathers those inside it (with their merge-order positions when
transposed), whose partition gives the key and the tie rule. A cut whose
bracket misses (or gathers too much) falls back to digit-by-digit
histograms (16 + 16 bits, the plan of `sgtv_jax.select`: the high digit,
then the low digit inside the bin holding the k-th key; transposed ties then
take one more pass per column). A tensor in one chunk is in memory: a
uniform sample of its keys brackets the k-th key in the same way. Ties at
the threshold go to the entries that come first in the merge order, counted
across chunks (transposed: per column). Random draws use the
entry's index in the merge order as threefry counter (`blockrng`). Sign
election and the (disjoint) mean are per entry.

One chunk (its selections then run in memory, with `trim`'s radix select):
tensors whose stack fits the budget, 1-D tensors, and `magprune` on a
transposed tensor (its rows are the stored columns: memory is the whole
stack). Selections (cut points, tie counts) run on the host in NumPy; each
chunk is then trimmed (`trim.keep` on the selected mask, `trim.magprune`,
`blockrng` draws) and merged by the library's own method (`get_method`, as
`merge_planned` calls it) in one jit-compiled program per chunk shape: every
chunk of a tensor is padded to the first chunk's rows (the methods are per
entry after their trims), so a tensor compiles once and tensors of one shape
and plan share the program (compiled with `XLA_OPTIONS`). Calibration trims (`wanda`, `sparsegpt`) are
refused: use `merge_planned` with the Hessian.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax import _checks
from sgtv_jax.defaults import MEMORY_BUDGET
from sgtv_jax.merge import blockrng
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.call import MergeCall, frozen, interpret, trim_kind
from sgtv_jax.merge.chunk_select import CutFinder, RowReader, Rows, Source, bytes_per_entry
from sgtv_jax.merge.keys import task_keys
from sgtv_jax.merge.plan import MergeInfo, PlanError, TensorPlan, maps_zero_to_zero
from sgtv_jax.merge.registry import get_method
from sgtv_jax.merge.specs import method_spec

DEFAULT_BUDGET = MEMORY_BUDGET
"""Default working-set budget of one tensor's merge, in bytes (the `memory_budget` config default too)."""

STREAMED_TRIMS = ("magnitude", "breadcrumbs", "random", "magprune", None)


def why_not_streamed(plan: TensorPlan) -> str | None:
    """None when `merge_rows` can merge `plan` in row chunks, else the reason (for a message)."""
    spec = method_spec(plan.method)
    if not spec.entrywise:  # slerp, karcher, model_stock, sce, the Hessian fits, ...
        return f"method {plan.method!r} needs whole tensors"
    kind = trim_kind(plan, spec)
    if kind not in STREAMED_TRIMS:
        return f"trim {kind!r} needs calibration statistics"
    if plan.method == "linear" and (plan.params or {}).get("normalize", True) is False:
        return "linear with normalize=false sums whole models (needs the base weights)"
    return None


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed large blocks for reuse instead of returning them to the OS.

    A streamed merge allocates and frees chunk-sized temporaries over and over; by
    default each one above malloc's mmap threshold is a fresh mapping whose pages
    fault in on first touch, which costs several times the arithmetic (measured
    here: 2.7 vs 0.3 ns per float32 for `a * 2`). Raising the mmap and trim
    thresholds (as `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` would)
    keeps them in the heap; peak RSS stays bounded by the working set. Process-wide,
    so left to the program to call once: the `sgtv` command does at start, a script
    that merges through the library calls it itself. Returns
    False where there is no glibc (nothing changed).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def chunk_rows(shape: Sequence[int], tasks: int, budget_bytes: int) -> int:
    """Rows per chunk so one chunk's working set fits `budget_bytes` (at least 1; all rows of a 1-D tensor)."""
    rows = int(shape[0]) if len(shape) else 1
    if len(shape) < 2:
        return max(rows, 1)
    per_row = math.prod(shape[1:]) * bytes_per_entry(tasks)
    return max(1, min(rows, budget_bytes // max(per_row, 1)))


def working_set_bytes(shape: Sequence[int], tasks: int, budget_bytes: int) -> int:
    """The working set of merging one tensor of `shape` within `budget_bytes`: one chunk's rows.

    `<= budget_bytes` unless a single row (or a 1-D tensor) is larger than it.
    """
    row_entries = math.prod(shape[1:]) if len(shape) >= 2 else max(math.prod(shape), 1)
    rows = chunk_rows(shape, tasks, budget_bytes) if len(shape) >= 2 else 1
    return rows * row_entries * bytes_per_entry(tasks)


@dataclasses.dataclass
class StreamStats:
    """What `merge_rows` did (filled in as it runs; complete once its iterator is exhausted).

    unchanged: no model changed the tensor (the output is the base);
    kept: per task, the fraction of entries the trim kept (nonzero);
    trim: the trim applied (None: none); rows_per_chunk; chunks; passes:
    reads of every model's rows (histograms, tie counts, merge).
    """

    unchanged: bool = False
    kept: list[float] = dataclasses.field(default_factory=list)
    trim: str | None = None
    rows_per_chunk: int = 0
    chunks: int = 0
    passes: int = 0

    @property
    def info(self) -> MergeInfo:
        return MergeInfo(self.trim, None)


def merge_rows(
    plan: TensorPlan,
    base: RowReader,
    models: Sequence[RowReader],
    shape: Sequence[int],
    *,
    out_dtype: np.dtype,
    budget_bytes: int = DEFAULT_BUDGET,
    transpose: bool = False,
    stats: StreamStats | None = None,
) -> Iterator[np.ndarray]:
    """Merge one tensor of `shape` chunk by chunk; yields its rows in order as `out_dtype` arrays.

    `plan`: the tensor's `TensorPlan` (data-free: no calibration). `base`,
    `models`: row readers of the base and of the T fine-tuned models.
    `transpose`: merge a 2-D tensor as its transpose (see the module doc).
    A tensor whose stack fits `budget_bytes` is one chunk (its selections
    then run in memory, `trim`'s own radix select). `stats` (optional) is
    filled in as the merge runs. Raises PlanError for what the plan cannot
    run (at once), ValueError for NaN / Inf task vectors or rows of the wrong
    shape, naming the tensor and model.
    """
    shape = tuple(int(s) for s in shape)
    tasks = len(models)
    if tasks == 0:
        raise ValueError(f"no models to merge for tensor {plan.name!r}")
    if len(plan.weights) != tasks or len(plan.densities) != tasks:
        raise ValueError(
            f"tensor {plan.name!r}: the plan has {len(plan.weights)} weights and "
            f"{len(plan.densities)} densities for {tasks} models"
        )
    if transpose and len(shape) != 2:
        raise ValueError(f"tensor {plan.name!r}: transpose needs a 2-D tensor, got shape {shape}")
    if not shape:
        raise ValueError(f"tensor {plan.name!r} is a scalar: merge it with merge_planned")
    reason = why_not_streamed(plan)
    if reason is not None:
        raise PlanError(f"tensor {plan.name!r} is not merged in row chunks: {reason}; use merge_planned")
    call = interpret(plan, ndim=len(shape) - 1)
    dens = _checks.densities(list(plan.densities), tasks, plan.name)
    stats = stats if stats is not None else StreamStats()
    step = chunk_rows(shape, tasks, budget_bytes)
    if len(shape) < 2 or (transpose and call.trim == "magprune"):
        step = shape[0]  # one row (a vector), or rows that are the stored columns: all at once
    stats.trim, stats.rows_per_chunk = call.trim, step
    src = Source(plan.name, base, models, shape)
    return _Chunked(call, dens, src, step, transpose, stats).run(out_dtype)


XLA_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
"""Compiler options of the chunk programs on CPU: no YNNPACK fusions (measured here: its reduce
over the task axis of a `[T, rows, cols]` stack ran ~20x slower than XLA's own loops). Other
backends compile with their defaults."""


def _compiler_options() -> dict[str, str] | None:
    return XLA_OPTIONS if jax.default_backend() == "cpu" else None


@functools.lru_cache(maxsize=64)
def _program(
    method: str,
    weights: tuple[float, ...],
    kw: tuple[tuple[str, Any], ...],
    modes: tuple[str, ...],
    dens: tuple[float, ...],
    rescale: bool,
) -> Callable[[Any, Any], tuple[jax.Array, jax.Array]]:
    """The jit-compiled trim-and-merge of one chunk: `(x [T, rows, cols] float32, masks [M, rows,
    cols] bool) -> (merged task vector [rows, cols] float32, kept entries per task [T])`.

    `modes[t]`: "mask" tasks take the next mask (`trim.keep`, rescaled by `1 / dens[t]` when
    `rescale`), "zero" tasks are zeros, the others pass as they are; then the method as
    `merge_planned` calls it. Cached: tensors of one plan share the program (one compile per
    chunk shape).
    """
    fn, spec, params = get_method(method), method_spec(method), dict(kw)

    def run(x: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
        ys, i = [], 0
        for t, mode in enumerate(modes):
            if mode == "mask":
                ys.append(trim_lib.keep(x[t], masks[i], dens[t], rescale=rescale))
                i += 1
            elif mode == "zero":
                ys.append(jnp.zeros_like(x[t]))
            else:
                ys.append(x[t])
        stack = jnp.stack(ys)
        if spec.trims:
            merged = fn(stack, list(weights), 1.0, trim=None, rescale=False, **params)
        else:
            merged = fn(stack, list(weights), **params)
        return merged, jnp.count_nonzero(stack.reshape(len(modes), -1), axis=1)

    return jax.jit(run, compiler_options=_compiler_options())


class _Chunked(CutFinder):
    """The chunked merge of one tensor (see the module doc): `call` executed chunk by chunk;
    `run` yields the output chunks."""

    def __init__(
        self, call: MergeCall, dens: tuple[float, ...], src: Source, step: int, transpose: bool, stats: StreamStats
    ) -> None:
        self.call, self.kind, self.dens, self.src = call, call.trim, dens, src
        self.transpose, self.stats = transpose, stats
        self.tasks = tasks = len(dens)
        self.rows, self.cols = src.shape[0], math.prod(src.shape[1:])
        self.n = self.rows * self.cols
        self.spans = [(r0, min(r0 + step, self.rows)) for r0 in range(0, self.rows, step)] or [(0, 0)]
        stats.chunks = len(self.spans)
        self.whole = len(self.spans) == 1
        self._cached: Rows | None = None
        kind, name = call.trim, call.name
        self.gamma = _checks.per_task(call.gamma, tasks, "gamma", name)
        self.epsilon = _checks.per_task(call.epsilon, tasks, "epsilon", name)
        if kind == "breadcrumbs":
            _checks.in_range(self.gamma, 0.0, 1.0, "gamma", name)
        self.keys: list[Any] = task_keys(call.key, tasks) if kind in trim_lib.RANDOM_TRIMS else [None] * tasks
        # "the m largest |d| of task t" for each selection: magnitude the top k; breadcrumbs
        # the top n_top + k minus the top n_top (ranks [n_top, n_top + k) of the stable order)
        self.ranks: dict[int, list[int]] = {}
        for t in range(tasks):
            if kind in ("magnitude", "breadcrumbs") and 0.0 < dens[t] < 1.0:
                k = self._count(dens[t])
                n_top = min(self._count(self.gamma[t]), self.n - k)
                self.ranks[t] = [k] if kind == "magnitude" else [n_top + k, n_top]
        # per task: "pass" (as is), "zero", "mask" (a selected or drawn mask), "magprune" (its own draw)
        self.modes = tuple(
            "pass" if kind is None or d >= 1.0 else "zero" if d <= 0.0 else "magprune" if kind == "magprune" else "mask"
            for d in dens
        )
        kw = frozen(call.method_kwargs())
        self.program = _program(call.method, call.weights, kw, self.modes, dens, call.rescale)
        try:  # the method's own checks of its parameters, at once (traced on a 1-entry chunk: no compile)
            jax.eval_shape(self.program, *self._program_args(1, 1))
        except (ValueError, TypeError) as e:
            raise PlanError(f"tensor {name!r}: {e}") from None

    def _count(self, fraction: float) -> int:
        """`round(fraction * n)`, or `int(fraction * n)` for count "floor" (as `trim`)."""
        return int(fraction * self.n) if self.call.count == "floor" else int(round(fraction * self.n))

    def _program_args(self, rows: int, cols: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """The program's argument shapes for a chunk of `rows` x `cols` entries."""
        masks = sum(m == "mask" for m in self.modes)
        return (
            jax.ShapeDtypeStruct((self.tasks, rows, cols), jnp.float32),
            jax.ShapeDtypeStruct((masks, rows, cols), jnp.bool_),
        )

    def run(self, out_dtype: np.dtype) -> Iterator[np.ndarray]:
        stats = self.stats
        zero_to_zero = maps_zero_to_zero(self.call.method)
        cuts, changed = self._find_cuts(unchanged_stops=zero_to_zero)  # no model changed it: one pass
        if changed is None:  # no selection pass ran: look for a change (stops at the first)
            changed = any(self._rows(r0, r1).changed for r0, r1 in self.spans)
        if not changed and zero_to_zero:  # the base, as the pipeline returns it
            stats.unchanged, stats.kept = True, [0.0] * self.tasks
            stats.passes += self._cached is None
            for r0, r1 in self.spans:
                b = (
                    self._cached.b
                    if self._cached is not None
                    else self.src.read(self.src.base, r0, r1, "base").astype(np.float32)
                )
                yield b.astype(out_dtype)
            return
        seen = {tm: 0 for tm in cuts}  # ties (of the counted kind) met in earlier chunks
        kept = np.zeros(self.tasks, np.int64)
        step = self.spans[0][1] - self.spans[0][0]  # every chunk is padded to the first one's rows
        for r0, r1 in self.spans:
            chunk = self._rows(r0, r1)
            self._cached = None
            rows = r1 - r0
            x = chunk.d.reshape(self.tasks, rows, self.cols)
            masks = np.zeros((sum(m == "mask" for m in self.modes), step, self.cols), np.bool_)
            i = 0
            for t, mode in enumerate(self.modes):
                if mode == "mask":
                    masks[i, :rows] = self._mask(t, chunk.keys[t].reshape(rows, self.cols), r0, cuts, seen)
                    i += 1
                elif mode == "magprune":  # drawn per row of the merge order (the whole tensor when transposed)
                    x[t] = self._magprune(t, x[t], r0)
            if rows < step:
                x = np.concatenate([x, np.zeros((self.tasks, step - rows, self.cols), np.float32)], axis=1)
            b = chunk.b
            del chunk
            merged_j, kept_j = self.program(x, masks)
            del x, masks
            kept += np.asarray(kept_j, np.int64)
            # b + merged, as the pipeline adds them: one pass over the program's output, no copy of it first
            merged = np.add(b.reshape(rows, self.cols), np.asarray(merged_j)[:rows], dtype=np.float32)
            del merged_j
            yield merged.reshape(b.shape).astype(out_dtype)
        stats.kept = [int(c) / max(self.n, 1) for c in kept]

    def _rows(self, r0: int, r1: int) -> Rows:
        """`Source.rows` (a read of the first chunk counts a pass); a tensor in one chunk is read
        once and kept until its merge."""
        if self._cached is not None:
            return self._cached
        self.stats.passes += r0 == self.spans[0][0]
        rows = self.src.rows(r0, r1)
        if self.whole:
            self._cached = rows
        return rows

    def _magprune(self, t: int, x: np.ndarray, r0: int) -> np.ndarray:
        """Task t's rows `[r0, r0 + len(x))` `[rows, cols]` pruned by `trim.magprune`, as in the whole tensor."""
        dens, eps, key = self.dens[t], self.epsilon[t], self.keys[t]
        if self.whole:  # the whole tensor in its own shape (a vector is one row)
            x = x.reshape(self.src.shape)
        if self.transpose:  # one chunk holding every row: the merge order's rows are the stored columns
            pruned = trim_lib.magprune(jnp.asarray(x.T), dens, key, epsilon=eps, rescale=self.call.rescale).T
        else:
            pruned = trim_lib.magprune(
                jnp.asarray(x), dens, key, epsilon=eps, rescale=self.call.rescale, offset=r0 * self.cols
            )
        return np.asarray(pruned, np.float32).reshape(-1, self.cols)

    def _mask(self, t: int, keys: np.ndarray, r0: int, cuts: dict, seen: dict) -> np.ndarray:
        """Task t's keep mask of rows `[r0, r0 + len(keys))` `[rows, cols]`, as `trim.trim` selects or
        draws it in the whole tensor (`keys`: the rows' reversed keys)."""
        shape = tuple(keys.shape)
        if self.kind == "random":
            if self.transpose:
                return np.asarray(blockrng.bernoulli_transposed_block(self.keys[t], self.dens[t], shape, r0, self.rows))
            return np.asarray(trim_lib.random_mask(self.keys[t], self.dens[t], shape, r0 * self.cols))
        m = self.ranks[t]
        mask = self._take(keys, cuts[(t, m[0])], seen, (t, m[0]))
        if self.kind == "breadcrumbs":
            mask &= ~self._take(keys, cuts[(t, m[1])], seen, (t, m[1]))
        return mask
