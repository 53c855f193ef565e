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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax import _checks
from sgtv_jax.merge import blockrng
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.keys import task_keys
from sgtv_jax.merge.methods import resolve_rescale
from sgtv_jax.merge.plan import MergeInfo, PlanError, TensorPlan, maps_zero_to_zero
from sgtv_jax.merge.registry import get_method
from sgtv_jax.merge.specs import PER_MODEL_DEFAULTS, MethodSpec, method_spec
from sgtv_jax.select import digit_plan

RowReader = Callable[[int, int], np.ndarray]
"""`(r0, r1) -> rows [r0, r1)` of one checkpoint's tensor, shape `[r1 - r0, *shape[1:]]`."""

DEFAULT_BUDGET = 1 << 30
"""Default working-set budget of one tensor's merge, in bytes."""

STREAMED_TRIMS = ("magnitude", "breadcrumbs", "random", "magprune", None)


def why_not_streamed(plan: TensorPlan) -> str | None:
    """None when `merge_rows` can merge `plan` in row chunks, else the reason (for a message)."""
    spec = method_spec(plan.method)
    if not spec.entrywise:  # slerp, karcher, model_stock, sce, the Hessian fits, ...
        return f"method {plan.method!r} needs whole tensors"
    kind = (plan.trim if plan.trim is not None else spec.default_trim) if spec.trims else None
    if kind not in STREAMED_TRIMS:
        return f"trim {kind!r} needs calibration statistics"
    if plan.method == "linear" and (plan.params or {}).get("normalize", True) is False:
        return "linear with normalize=false sums whole models (needs the base weights)"
    return None


_KEY_MAX = np.uint32(0x7FFFFFFF)  # |d| bit patterns are <= this (no NaN)
_KEY_INF = int(_KEY_MAX) - 0x7F800000  # keys <= this: |d| is Inf or NaN
_DIGITS = digit_plan(32, 1 << 32)  # 16 + 16 bits, whatever the tensor's size


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed large blocks for reuse instead of returning them to the OS.

    A streamed merge allocates and frees chunk-sized temporaries over and over; by
    default each one above malloc's mmap threshold is a fresh mapping whose pages
    fault in on first touch, which costs several times the arithmetic (measured
    here: 2.7 vs 0.3 ns per float32 for `a * 2`). Raising the mmap and trim
    thresholds (as `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` would)
    keeps them in the heap; peak RSS stays bounded by the working set. Process-wide,
    so left to the program (the `sgtv` command, a script) to call once. Returns
    False where there is no glibc (nothing changed).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def bytes_per_entry(tasks: int) -> int:
    """Working bytes per tensor entry of one chunk, for `tasks` models.

    float32: base (4) + task vectors (4T) + trimmed vectors (4T) + the merge's
    temporaries (weighted vectors, agreement masks, products: ~12T) + merged
    and output (8).
    """
    return 12 + 20 * tasks


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


class _Cut(NamedTuple):
    """The m largest |d| of one task: keys below `key`, plus the first `ties` keys equal to it
    in the merge order; transposed, that is every tie in columns < `col` and the first
    `col_ties` ties (by row) of column `col`."""

    key: int
    ties: int
    col: int = -1
    col_ties: int = 0


class _Source:
    """The base and model readers of one tensor: float32 rows and task vectors, checked."""

    def __init__(self, name: str, base: RowReader, models: Sequence[RowReader], shape: tuple[int, ...]) -> None:
        self.name, self.base, self.models, self.shape = name, base, list(models), shape

    def read(self, reader: RowReader, r0: int, r1: int, what: str) -> np.ndarray:
        a = np.asarray(reader(r0, r1))
        want = (r1 - r0,) + self.shape[1:]
        if a.shape != want:
            raise ValueError(f"tensor {self.name!r}: {what} rows [{r0}, {r1}) have shape {a.shape}, expected {want}")
        return a

    def rows(self, r0: int, r1: int) -> _Rows:
        """Rows `[r0, r1)`: base float32, task vectors `model - base` float32 and their keys, checked
        for NaN / Inf."""
        b = self.read(self.base, r0, r1, "base").astype(np.float32, copy=False)
        d = np.empty((len(self.models),) + b.shape, np.float32)
        keys = np.empty(d.shape, np.uint32)
        bad, changed = [], False
        for t, reader in enumerate(self.models):
            np.subtract(self.read(reader, r0, r1, f"model {t}").astype(np.float32, copy=False), b, out=d[t])
            k = np.abs(d[t], out=keys[t].view(np.float32)).view(np.uint32)
            np.subtract(_KEY_MAX, k, out=k)
            kmin = int(k.min()) if k.size else int(_KEY_MAX)
            if kmin <= _KEY_INF:  # |d| >= inf bits: Inf or NaN
                bad.append((t, int(np.count_nonzero(~np.isfinite(d[t])))))
            changed = changed or kmin != _KEY_MAX  # some |d| > 0
        if bad:
            raise ValueError(
                f"NaN or Inf in task vector(s) for tensor {self.name!r} (rows [{r0}, {r1})): "
                + ", ".join(f"model {t} ({c} entries)" for t, c in bad)
            )
        return _Rows(b, d, keys, changed)


class _Rows(NamedTuple):
    """One chunk: base `[rows, ...]`, task vectors `d` `[T, rows, ...]` and their reversed keys
    (`0x7FFFFFFF - bits(|d|)`: the k largest |d| are the k smallest keys); `changed`: some
    task-vector entry is nonzero."""

    b: np.ndarray
    d: np.ndarray
    keys: np.ndarray
    changed: bool


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
    spec = method_spec(plan.method)
    kind = (plan.trim if plan.trim is not None else spec.default_trim) if spec.trims else None
    reason = why_not_streamed(plan)
    if reason is not None:
        raise PlanError(f"tensor {plan.name!r} is not merged in row chunks: {reason}; use merge_planned")
    if spec.trims and kind is None and any(d != 1.0 for d in plan.densities):
        raise PlanError(
            f"density {list(plan.densities)} < 1 for tensor {plan.name!r} but method "
            f"{plan.method!r} does not trim by itself: set trim (e.g. magnitude or sparsegpt)"
        )
    dens = _checks.densities(list(plan.densities), tasks, plan.name)
    stats = stats if stats is not None else StreamStats()
    step = chunk_rows(shape, tasks, budget_bytes)
    if len(shape) < 2 or (transpose and kind == "magprune"):
        step = shape[0]  # one row (a vector), or rows that are the stored columns: all at once
    stats.trim, stats.rows_per_chunk = kind, step
    src = _Source(plan.name, base, models, shape)
    return _Chunked(plan, spec, kind, dens, src, step, transpose, stats).run(out_dtype)


XLA_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
"""Compiler options of the chunk programs on CPU: no YNNPACK fusions (measured here: its reduce
over the task axis of a `[T, rows, cols]` stack ran ~20x slower than XLA's own loops). Other
backends compile with their defaults."""


def _compiler_options() -> dict[str, str] | None:
    return XLA_OPTIONS if jax.default_backend() == "cpu" else None


SAMPLE = 1 << 16
"""Keys sampled to bracket a cut point of a tensor held in memory."""


def _cut_at(key: int, below: int, equal: int, m: int) -> _Cut:
    """The cut taking the m smallest keys when `below` keys are < `key` and `equal` are == it."""
    ties = m - below
    return _Cut(key + 1, 0) if ties == equal else _Cut(key, ties)


def _bracket_cut(keys: np.ndarray, m: int) -> _Cut | None:
    """The cut of the m smallest of `keys` `[n]` (1 <= m <= n), or None when the bracket misses.

    Small n: `np.partition`. Else the keys at ranks `m/n * s -/+ (6 sigma + 16)` of a
    uniform sample of s = SAMPLE positions bracket the m-th key; one pass counts the keys
    below the bracket and gathers those inside (at most n / 8), whose partition gives it.
    """
    n = keys.size
    if n <= 4 * SAMPLE:
        key = int(np.partition(keys, m - 1)[m - 1])
        return _cut_at(key, int(np.count_nonzero(keys < key)), int(np.count_nonzero(keys == key)), m)
    sample = np.sort(keys[np.random.default_rng(0).integers(0, n, SAMPLE)])
    q = m / n
    delta = 6.0 * math.sqrt(SAMPLE * q * (1.0 - q)) + 16.0
    lo_i, hi_i = int(q * SAMPLE - delta), int(q * SAMPLE + delta) + 1
    lo = int(sample[lo_i]) if lo_i >= 0 else 0
    hi = int(sample[hi_i]) if hi_i < SAMPLE else int(_KEY_MAX)
    below = int(np.count_nonzero(keys < np.uint32(lo)))
    if below >= m:
        return None
    if lo == hi:
        equal = int(np.count_nonzero(keys == np.uint32(lo)))
        return _cut_at(lo, below, equal, m) if below + equal >= m else None
    inside = (keys - np.uint32(lo)) <= np.uint32(hi - lo)  # keys below lo wrap around: outside
    count = int(np.count_nonzero(inside))
    if below + count < m:
        return None
    if count > n // 8:  # a wide bracket, usually many ties at its ends: settle those first
        at_lo = int(np.count_nonzero(keys == np.uint32(lo)))
        if below + at_lo >= m:
            return _cut_at(lo, below, at_lo, m)
        at_hi = int(np.count_nonzero(keys == np.uint32(hi)))
        if below + count - at_hi < m:
            return _cut_at(hi, below + count - at_hi, at_hi, m)
        if count - at_lo - at_hi > n // 8:
            return None
        below += at_lo
        inside &= (keys != np.uint32(lo)) & (keys != np.uint32(hi))
    cand = keys[inside]
    key = int(np.partition(cand, m - below - 1)[m - below - 1])
    return _cut_at(key, below + int(np.count_nonzero(cand < key)), int(np.count_nonzero(cand == key)), m)


SAMPLE_ROWS = 256
"""Whole rows sampled (at least) to bracket a cut point of a tensor read in chunks."""


class _Counted(NamedTuple):
    """Cuts found by the counting pass ((task, m) -> cut) and whether any task vector is nonzero."""

    cuts: dict[tuple[int, int], _Cut]
    changed: bool


def _row_bracket(sample: np.ndarray, q: float) -> tuple[int, int]:
    """Keys `[lo, hi]` that hold the `q`-quantile key of a tensor with high probability, from
    the keys of sampled whole rows `[rows, cols]`.

    The sample ranks `q s -/+ (6 sigma + 16)`, s the sample size, sigma the binomial spread
    times the design effect of sampling rows (rows differ in scale): the variance between the
    rows' fractions below the sample quantile over the binomial one (at least 1).
    """
    flat = np.sort(sample.reshape(-1))
    s = flat.size
    kq = flat[min(s - 1, int(q * s))]
    p_rows = np.count_nonzero(sample < kq, axis=1) / sample.shape[1]
    binom = q * (1.0 - q) / s
    deff = max(1.0, float(np.var(p_rows)) / sample.shape[0] / binom) if binom > 0 else 1.0
    delta = 6.0 * math.sqrt(s * q * (1.0 - q) * deff) + 16.0
    lo_i, hi_i = int(q * s - delta), int(q * s + delta) + 1
    lo = int(flat[lo_i]) if lo_i >= 0 else 0
    hi = int(flat[hi_i]) if hi_i < s else int(_KEY_MAX)
    return lo, hi


def _nth_true(flags: np.ndarray, nth: int) -> int:
    """Index of the `nth` (1-based) True of the bool vector `flags`: counts per block, then one block."""
    block = 1 << 16
    whole = flags.size // block * block
    counts = np.count_nonzero(flags[:whole].reshape(-1, block), axis=1)
    cum = np.cumsum(counts)
    j = int(np.searchsorted(cum, nth))  # the first block whose running count reaches nth
    before = int(cum[j - 1]) if j else 0
    start = j * block
    return start + int(
        np.flatnonzero(flags[start : start + block] if j < len(counts) else flags[start:])[nth - before - 1]
    )


def _frozen(kw: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """`kw` as a hashable key (lists as tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))


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


class _Chunked:
    """The chunked merge of one tensor (see the module doc); `run` yields the output chunks."""

    def __init__(
        self,
        plan: TensorPlan,
        spec: MethodSpec,
        kind: str | None,
        dens: tuple[float, ...],
        src: _Source,
        step: int,
        transpose: bool,
        stats: StreamStats,
    ) -> None:
        self.plan, self.spec, self.kind, self.dens, self.src = plan, spec, kind, dens, src
        self.transpose, self.stats = transpose, stats
        self.tasks = len(dens)
        self.rows, self.cols = src.shape[0], math.prod(src.shape[1:])
        self.n = self.rows * self.cols
        self.spans = [(r0, min(r0 + step, self.rows)) for r0 in range(0, self.rows, step)] or [(0, 0)]
        stats.chunks = len(self.spans)
        self.whole = len(self.spans) == 1
        self._cached: _Rows | None = None
        self.kw = dict(plan.params or {})
        self.rescale = (
            resolve_rescale(self.kw.pop("rescale", None), spec.rescale_default, kind) if spec.trims else False
        )
        count = self.kw.pop("count", "round")  # how many entries a top-k trim keeps (belongs to the trim)
        if count not in trim_lib.COUNTS:
            raise PlanError(
                f"unknown count rule {count!r} for tensor {plan.name!r}; known: {', '.join(trim_lib.COUNTS)}"
            )
        self.count = count
        tasks, name = self.tasks, plan.name
        self.gamma = _checks.per_task(
            PER_MODEL_DEFAULTS["gamma"] if plan.gamma is None else list(plan.gamma), tasks, "gamma", name
        )
        self.epsilon = _checks.per_task(
            PER_MODEL_DEFAULTS["epsilon"] if plan.epsilon is None else list(plan.epsilon), tasks, "epsilon", name
        )
        if kind == "breadcrumbs":
            _checks.in_range(self.gamma, 0.0, 1.0, "gamma", name)
        self.keys: list[Any] = task_keys(plan.key, tasks) if kind in trim_lib.RANDOM_TRIMS else [None] * tasks
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
        self.program = _program(plan.method, tuple(plan.weights), _frozen(self.kw), self.modes, dens, self.rescale)
        try:  # the method's own checks of its parameters, at once (traced on a 1-entry chunk: no compile)
            jax.eval_shape(self.program, *self._program_args(1, 1))
        except (ValueError, TypeError) as e:
            raise PlanError(f"tensor {plan.name!r}: {e}") from None

    def _count(self, fraction: float) -> int:
        """`round(fraction * n)`, or `int(fraction * n)` for count "floor" (as `trim`)."""
        return int(fraction * self.n) if self.count == "floor" else int(round(fraction * self.n))

    def _program_args(self, rows: int, cols: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """The program's argument shapes for a chunk of `rows` x `cols` entries."""
        masks = sum(m == "mask" for m in self.modes)
        return (
            jax.ShapeDtypeStruct((self.tasks, rows, cols), jnp.float32),
            jax.ShapeDtypeStruct((masks, rows, cols), jnp.bool_),
        )

    def run(self, out_dtype: np.dtype) -> Iterator[np.ndarray]:
        stats = self.stats
        cuts, changed = self._find_cuts()
        if changed is None:  # no selection pass ran: look for a change (stops at the first)
            changed = any(self._rows(r0, r1).changed for r0, r1 in self.spans)
        if not changed and maps_zero_to_zero(self.plan.method):  # the base, as the pipeline returns it
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
            merged = np.array(merged_j, np.float32)[:rows]
            del merged_j
            merged += b.reshape(merged.shape)  # b + merged, as the pipeline adds them
            yield merged.reshape(b.shape).astype(out_dtype)
        stats.kept = [int(c) / max(self.n, 1) for c in kept]

    def _rows(self, r0: int, r1: int) -> _Rows:
        """`_Source.rows` (a read of the first chunk counts a pass); a tensor in one chunk is read
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
            pruned = trim_lib.magprune(jnp.asarray(x.T), dens, key, epsilon=eps, rescale=self.rescale).T
        else:
            pruned = trim_lib.magprune(
                jnp.asarray(x), dens, key, epsilon=eps, rescale=self.rescale, offset=r0 * self.cols
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

    def _take(self, keys: np.ndarray, cut: _Cut, seen: dict, tm: tuple[int, int]) -> np.ndarray:
        """This chunk's entries among the cut's m largest (`keys` `[rows, cols]`); updates `seen`."""
        out = keys < np.uint32(cut.key)
        if cut.ties == 0:
            return out
        eq = keys == np.uint32(cut.key)
        if not self.transpose:  # the first `ties` equal keys in row-major order
            flat = eq.reshape(-1)
            count = int(np.count_nonzero(flat))
            if seen[tm] + count <= cut.ties:
                out |= eq
            elif seen[tm] < cut.ties:
                end = _nth_true(flat, cut.ties - seen[tm]) + 1
                out.reshape(-1)[:end] |= flat[:end]
            seen[tm] += count
            return out
        # transposed: every tie left of column `col`, and the first `col_ties` of column `col` by row
        out[:, : cut.col] |= eq[:, : cut.col]
        col = eq[:, cut.col]
        out[:, cut.col] |= col & (seen[tm] + np.cumsum(col) <= cut.col_ties)
        seen[tm] += int(np.count_nonzero(col))
        return out

    def _find_cuts(self) -> tuple[dict[tuple[int, int], _Cut], bool | None]:
        """Key and tie rule of every (task, m) the trims need: one pass per digit (+1 for transposed ties).

        Returns (cuts, whether any task vector is nonzero; None when no pass ran).
        """
        cuts: dict[tuple[int, int], _Cut] = {}
        open_: dict[tuple[int, int], tuple[int, int]] = {}  # (t, m) -> (prefix, count below it)
        for t, ms in self.ranks.items():
            for m in ms:
                if m <= 0:
                    cuts[(t, m)] = _Cut(0, 0)  # no key is below 0: keeps nothing
                else:
                    open_[(t, m)] = (0, 0)
        if not open_:
            return cuts, None
        changed = False
        if self.whole:  # in memory: a sampled bracket (one pass), the histograms only if it misses
            chunk = self._rows(*self.spans[0])
            changed = chunk.changed
            for t, m in list(open_):
                cut = _bracket_cut(chunk.keys[t].reshape(-1), m)
                if cut is not None:
                    cuts[(t, m)] = cut
                    del open_[(t, m)]
        else:  # a sampled bracket per cut, one counting pass; the histograms only for those it misses
            counted = self._counted_cuts(list(open_))
            for tm, cut in counted.cuts.items():
                cuts[tm] = cut
                del open_[tm]
            changed = counted.changed
        for i, (shift, width) in enumerate(_DIGITS):
            if not open_:
                break
            bins = 1 << width
            groups = {(t, prefix) for (t, _), (prefix, _) in open_.items()}  # one histogram per (task, prefix)
            hists = {g: np.zeros(bins, np.int64) for g in groups}
            for r0, r1 in self.spans:
                chunk = self._rows(r0, r1)
                changed = changed or chunk.changed
                for t in {t for t, _ in groups}:
                    kr = chunk.keys[t].reshape(-1)
                    if i == 0:  # keys < 2^31: the top digit needs no mask
                        hists[(t, 0)] += np.bincount(kr >> np.uint32(shift), minlength=bins)
                        continue
                    high = kr >> np.uint32(shift + width)
                    for gt, prefix in groups:
                        if gt == t:
                            sel = kr[high == np.uint32(prefix)]
                            hists[(t, prefix)] += np.bincount(
                                (sel >> np.uint32(shift)) & np.uint32(bins - 1), minlength=bins
                            )
            for (t, m), (prefix, below) in list(open_.items()):
                hist = hists[(t, prefix)]
                cum = below + np.cumsum(hist)
                b = int(np.argmax(cum >= m))
                below_b = int(cum[b] - hist[b])
                if below_b + int(hist[b]) == m:  # the cut takes all of bin b: keys below the next bin
                    cuts[(t, m)] = _Cut((((prefix << width) | b) + 1) << shift, 0)
                    del open_[(t, m)]
                elif shift == 0:  # the key is complete; some of the hist[b] equal keys are taken
                    cuts[(t, m)] = _Cut((prefix << width) | b, m - below_b)
                    del open_[(t, m)]
                else:
                    open_[(t, m)] = ((prefix << width) | b, below_b)
            if not open_:
                break
        if self.transpose and any(c.ties and c.col < 0 for c in cuts.values()):
            cuts = self._column_ties(cuts)
        return cuts, changed

    def _sample(self) -> np.ndarray:
        """Reversed keys `[T, rows, cols]` of a fixed random set of whole rows (sorted; read one by one)."""
        n_rows = min(self.rows, max(SAMPLE_ROWS, SAMPLE // max(self.cols, 1)), max(16, 8 * SAMPLE // max(self.cols, 1)))
        picked = np.sort(np.random.default_rng(0).choice(self.rows, n_rows, replace=False))
        return np.concatenate(
            [self.src.rows(int(r), int(r) + 1).keys.reshape(self.tasks, 1, self.cols) for r in picked], axis=1
        )

    def _counted_cuts(self, wanted: list[tuple[int, int]]) -> _Counted:
        """Cuts of `wanted` (task, m) from one pass: a bracket `[lo, hi]` per cut from a sample of
        whole rows (widened by the spread between rows), then per chunk the keys below `lo` counted
        and those inside gathered (with their merge-order positions when transposed, for the tie
        rule); the m-th key is then selected among the gathered. Cuts whose bracket misses, or
        whose gathered keys outgrow a quarter of a chunk's working set (4 MiB at least), are left out."""
        out = {tm: _Cut(int(_KEY_MAX) + 1, 0) for tm in wanted if tm[1] >= self.n}  # all: below one past the largest
        sample = self._sample()
        brackets = {(t, m): _row_bracket(sample[t], m / self.n) for t, m in wanted if m < self.n}
        room = max(1 << 22, (self.spans[0][1] - self.spans[0][0]) * self.cols * bytes_per_entry(self.tasks) // 4)
        per_entry = 12 if self.transpose else 4
        below = dict.fromkeys(brackets, 0)
        gathered: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray | None]]] = {tm: [] for tm in brackets}
        used, changed = 0, False
        for r0, r1 in self.spans:
            chunk = self._rows(r0, r1)
            changed = changed or chunk.changed
            for tm, (lo, hi) in brackets.items():
                if tm not in gathered:
                    continue
                kr = chunk.keys[tm[0]].reshape(-1)
                below[tm] += int(np.count_nonzero(kr < np.uint32(lo)))
                idx = np.flatnonzero((kr - np.uint32(lo)) <= np.uint32(hi - lo))  # keys below lo wrap: outside
                used += idx.size * per_entry
                if used > room:  # too many inside: leave it to the histograms
                    used -= sum(k.size for k, _ in gathered.pop(tm)) * per_entry + idx.size * per_entry
                    continue
                pos = None
                if self.transpose:  # merge order: column-major
                    pos = (idx % self.cols) * self.rows + (r0 + idx // self.cols)
                gathered[tm].append((kr[idx], pos))
        for tm, parts in gathered.items():
            m, lo_below = tm[1], below[tm]
            cand = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, np.uint32)
            if lo_below >= m or lo_below + cand.size < m:
                continue  # the bracket missed
            key = int(np.partition(cand, m - lo_below - 1)[m - lo_below - 1])
            eq = cand == np.uint32(key)
            cut = _cut_at(key, lo_below + int(np.count_nonzero(cand < np.uint32(key))), int(np.count_nonzero(eq)), m)
            if cut.ties and self.transpose:  # the first `ties` equal keys in the merge order
                order = np.sort(np.concatenate([p for _, p in parts])[eq])
                last = int(order[cut.ties - 1])
                col = last // self.rows
                cut = cut._replace(
                    col=col, col_ties=int(np.count_nonzero((order >= col * self.rows) & (order <= last)))
                )
            out[tm] = cut
        return _Counted(out, changed)

    def _column_ties(self, cuts: dict[tuple[int, int], _Cut]) -> dict[tuple[int, int], _Cut]:
        """Transposed merge order is column-major: per column, count the keys equal to each cut (one pass)."""
        per_col = {tm: np.zeros(self.cols, np.int64) for tm, c in cuts.items() if c.ties}
        for r0, r1 in self.spans:
            keys = self._rows(r0, r1).keys
            for t, m in per_col:
                kr = keys[t].reshape(r1 - r0, self.cols)
                per_col[(t, m)] += np.count_nonzero(kr == np.uint32(cuts[(t, m)].key), axis=0)
        for tm, counts in per_col.items():
            cut = cuts[tm]
            cum = np.cumsum(counts)
            col = int(np.argmax(cum >= cut.ties))
            cuts[tm] = cut._replace(col=col, col_ties=cut.ties - int(cum[col] - counts[col]))
        return cuts
