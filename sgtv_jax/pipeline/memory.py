"""Peak-memory estimate of a merge, from the config and the checkpoints' headers (no weights read).

With `T` fine-tuned models, hidden size `D`, `A` attention heads, micro-batch
`b` (`batch_size`) and the calibration sets `s` the `hessian_source` needs (one
shared set for `merged` / `base`; one per model for `per_task`), each with
`n_s` windows (`nsamples`) of `S_s` tokens (`seqlen`), in float32 (4 bytes):

    activations = 4 D (sum_s n_s S_s + max_s n_s S_s)
                  every stream's hidden states, plus the block outputs being built
    attention   = 4 * 2 A max_s(min(b, n_s) S_s^2)
                  scores and probabilities of one micro-batch
    hessians    = 4 k sum_{linear W in a block} cols(W)^2
                  k = T for per_task, else 1 (shared inputs counted per weight: an upper bound)
    obs         = 4 max_W (3 T rows(W) cols(W) + 3 k cols(W)^2)
                  the largest OBS problem: task vectors, working copy and result; H, damped H, factor
    block       = 4 (T + 1) P_block
                  one decoder block of the base and of every model (P_block parameters)
    outer       = max(min(N (12 + 20 T), max(B, R (12 + 20 T))) + 4 N,  4 k N)
                  the largest tensor outside the blocks (e.g. the embedding: N entries,
                  R per row), merged data-free as a by-name merge merges it (in row
                  chunks within `memory_budget` B) and joined; then the embeddings
                  the calibration streams hold (k = T for per_task, else 1)

    peak ~ activations + attention + hessians + obs + block + outer

`estimate_calibrated` computes this from numbers alone (`ModelShapes`, e.g.
`llama_shapes`, and the calibration sets' `CalibrationShape`s); `estimate_memory`
reads them from the config and the checkpoint headers and calls it.
The calibration terms are 0 when no tensor uses calibration data. The sum is
an upper bound in spirit (the outer tensors are merged before the blocks);
XLA's own workspaces and the Python process itself come on top.

A merge by tensor name (`datafree.py`: no calibration data, any
architecture) holds one output tensor's merge at a time. With `B` the
`memory_budget` (default 256 MiB), a tensor of `N` entries, `R` per row
(`N / rows`), costs `N (12 + 20 T)` bytes merged whole (float32 base, task
vectors, trimmed vectors, the merge's temporaries and output:
`streaming.bytes_per_entry`), and at most `max(B, R (12 + 20 T))` merged in
row chunks, which every tensor over `B` is unless its method needs whole
tensors (`streaming.why_not_streamed`) or it is a vector:

    tensor = max over merged tensors of
             min(N (12 + 20 T), max(B, R (12 + 20 T)))    (row-chunked methods)
             N (12 + 20 T)                                 (methods on whole tensors)

and nothing else of the models (the writer holds one output chunk).

A merge that learns its weights (`adamerging`, `adamerge.py`) peaks in its
learning pass, on whole float32 models of `P` parameters, `L` blocks, vocabulary
`V`, `b` = `batch_size` windows of `S` tokens per step:

    models      = 4 (2 T + 2) P       base, fine-tuned models, task vectors, merged model
    activations = 4 b S (D (L + 1) + 3 V) + 4 * 2 A b S^2
                  each block's input (kept between passes), the logits and their
                  softmax and gradient, one block's attention scores

the merge by name after it needs far less.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from convert.namemaps import get_name_map
from convert.readers import hf_config_object, open_checkpoint
from sgtv_jax.defaults import DISTILL_TOPK
from sgtv_jax.errors import ResourceError
from sgtv_jax.merge.streaming import bytes_per_entry, why_not_streamed, working_set_bytes
from sgtv_jax.models import get_family
from sgtv_jax.pipeline.byname import MERGE
from sgtv_jax.pipeline.check import base_model_type, num_layers_of, read_hf_config
from sgtv_jax.pipeline.checkpoints import Checkpoints
from sgtv_jax.pipeline.config import DEFAULT_MEMORY_BUDGET, MergeConfig
from sgtv_jax.pipeline.datafree import plan_checkpoints, uses_by_name, whole_tensor_bytes
from sgtv_jax.pipeline.mapped import headers_plan
from sgtv_jax.pipeline.planning import plan_tensor

F32 = 4


class Term(NamedTuple):
    """One term of the estimate: bytes, what it is, and the config knobs that shrink it."""

    name: str
    bytes: int
    detail: str
    knobs: tuple[str, ...]


class MemoryEstimate(NamedTuple):
    """The terms of the module-doc formula; `total` is their sum (bytes); `formula`: the formula
    in words (shown by `summary`; empty: the terms say it)."""

    terms: tuple[Term, ...]
    formula: str = ""

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def largest(self, n: int = 3) -> list[Term]:
        return sorted((t for t in self.terms if t.bytes), key=lambda t: -t.bytes)[:n]

    def summary(self) -> str:
        parts = ", ".join(f"{t.name} {human(t.bytes)}" for t in self.largest())
        out = f"memory estimate: {human(self.total)} peak ({parts})"
        return out + (f"\n  {self.formula}" if self.formula else "")


def human(n: float) -> str:
    """Bytes in binary units, e.g. `1.5 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # unreachable


class Linear(NamedTuple):
    """A linear weight of a block as `[rows, cols]`: `cols` is its input width (the Hessian's size)."""

    rows: int
    cols: int


class ModelShapes(NamedTuple):
    """What the calibrated-merge formula needs of a model: numbers only, no files.

    `linears`: the linear weights of one block; `block_params`: all parameters of one block;
    `outer`: entries of the largest tensor outside the blocks (e.g. the embedding);
    `outer_row`: entries per stored row of it (0: one row, merged whole)."""

    hidden: int
    heads: int
    linears: tuple[Linear, ...]
    block_params: int
    outer: int
    outer_row: int = 0


class CalibrationShape(NamedTuple):
    """One calibration set: `nsamples` windows of `seqlen` tokens."""

    nsamples: int
    seqlen: int


def llama_shapes(
    hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None
) -> ModelShapes:
    """`ModelShapes` of a LLaMA-style block (q k v o, gate up down, two RMSNorms) and a `[vocab, hidden]` embedding."""
    hd = head_dim or hidden // heads
    q, kv = heads * hd, (kv_heads or heads) * hd
    linears = (
        Linear(q, hidden),
        Linear(kv, hidden),
        Linear(kv, hidden),
        Linear(hidden, q),
        Linear(intermediate, hidden),
        Linear(intermediate, hidden),
        Linear(hidden, intermediate),
    )
    return ModelShapes(
        hidden, heads, linears, sum(w.rows * w.cols for w in linears) + 2 * hidden, vocab * hidden, hidden
    )


def _model_layout(cfg: MergeConfig) -> tuple[ModelShapes, str]:
    """The base model's `ModelShapes` and the name of its largest tensor outside the blocks,
    from config.json and the tensor headers."""

    hf = read_hf_config(cfg.base_model)
    mt = hf["model_type"]
    obj = hf_config_object(hf)
    name_map, family = get_name_map(mt), get_family(mt)
    ckpt = open_checkpoint(cfg.base_model)
    try:
        shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
    finally:
        ckpt.close()
    rules = {n: name_map.rule_for_hf(n, obj) for n in shapes}
    prefixes = tuple(family.hf_block_prefix(i) for i in range(num_layers_of(hf)))
    prefix0 = prefixes[0] if prefixes else "\0"
    block_rules = {n: r for n, r in rules.items() if r is not None and n.startswith(prefixes)}
    is_block = list(block_rules)
    linears, block_params = [], 0
    for n in is_block:
        if not n.startswith(prefix0):
            continue
        shape = shapes[n]
        block_params += math.prod(shape)
        if len(shape) == 2 and n.endswith(".weight"):
            rows, cols = shape if block_rules[n].transpose else shape[::-1]  # torch layout is [out, in]
            linears.append(Linear(int(rows), int(cols)))
    block_set = set(is_block)
    outer_name = max(
        (n for n in shapes if n not in block_set and rules[n] is not None),
        key=lambda n: math.prod(shapes[n]),
        default="",
    )
    outer = shapes.get(outer_name, ())
    hidden = int(hf.get("hidden_size", hf.get("n_embd", 0)))
    heads = int(hf.get("num_attention_heads", hf.get("n_head", 0)))
    row = math.prod(outer[1:]) if len(outer) >= 2 else 0
    n_outer = math.prod(outer) if outer else 0
    return ModelShapes(hidden, heads, tuple(linears), block_params, n_outer, row), outer_name


def _estimate_by_name(cfg: MergeConfig) -> MemoryEstimate:
    """The by-name merge's term (module doc), from the plan of `byname.plan_by_name` (headers only)."""

    ckpts = Checkpoints(cfg)
    try:
        plan = plan_checkpoints(ckpts)
    finally:
        ckpts.close()
    T, budget = len(cfg.models), cfg.memory_budget
    worst, what = 0, "no merged tensor"
    for e in plan.entries:
        if e.action != MERGE:
            continue
        whole = whole_tensor_bytes(e.shape, T)
        tp = plan_tensor(cfg, e.name, e.block, e.depth, linear=False)
        chunked = whole > budget and len(e.shape) >= 2 and why_not_streamed(tp) is None
        need = working_set_bytes(e.shape, T, budget) if chunked else whole
        if need > worst:
            worst = need
            what = f"{e.name} {list(e.shape)} " + ("in row chunks" if chunked else "whole")
    per = bytes_per_entry(T)
    formula = (
        f"formula: max over merged tensors of min(N*{per}, max(B, R*{per})) bytes (N entries, R per row, "
        f"{per} = 12 + 20 T for T={T} models, B = memory_budget = {human(budget)}); "
        "N*(12 + 20 T) for methods that need whole tensors"
    )
    return MemoryEstimate(
        (Term("tensor", worst, f"the largest merge working set: {what}", ("memory_budget", "the number of models")),),
        formula,
    )


def estimate_memory(cfg: MergeConfig) -> MemoryEstimate:
    """The module-doc estimate for `cfg` (reads config.json and tensor headers only)."""

    if cfg.slices or cfg.tokenizer is not None:
        # slices / a re-indexed vocabulary: their own plan
        if (mapped := _estimate_mapped(cfg)) is not None:
            return mapped
    if cfg.method_spec.learns_weights:
        return _estimate_learning(cfg)
    if uses_by_name(cfg, base_model_type(cfg)):
        return _estimate_by_name(cfg)
    T = len(cfg.models)
    per_task = cfg.hessian_source in ("per_task", "per_task_merged")  # one calibration set and H per model
    if not any(cfg.calibration_for(t) is not None for t in range(T)):
        wanted = []
    elif per_task:
        wanted = [cfg.calibration_for(t) for t in range(T)]
    else:
        wanted = [cfg.calibration or cfg.calibration_for(0)]
    # validation gives every model data when a trim needs it
    sets = [CalibrationShape(c.nsamples, c.seqlen) for c in wanted if c is not None]
    shapes, outer = _model_layout(cfg)
    return estimate_calibrated(
        shapes,
        tasks=T,
        sets=sets,
        batch_size=cfg.batch_size,
        per_task=per_task,
        budget=cfg.memory_budget,
        streamed=why_not_streamed(
            plan_tensor(cfg, outer, None, num_layers_of(read_hf_config(cfg.base_model)), linear=False)
        )
        is None,
    )


def _estimate_learning(cfg: MergeConfig) -> MemoryEstimate:
    """The learning pass of a method that learns its weights (module doc), from config.json and the headers."""

    hf = read_hf_config(cfg.base_model)
    ckpt = open_checkpoint(cfg.base_model)
    try:
        params = sum(math.prod(ckpt.shape(n)) for n in ckpt.names())
    finally:
        ckpt.close()
    T, b = len(cfg.models), cfg.batch_size
    S = cfg.calibration.seqlen if cfg.calibration is not None else 0
    teacher: tuple[Term, ...] = ()
    own = [m.calibration for m in cfg.models if m.calibration is not None]
    if cfg.parameters.get("objective") == "distill" and own:
        # every task's windows in one step, padded to the longest; each specialist's top-k kept (merge.distill)
        S, N, b = max(c.seqlen for c in own), max(c.nsamples for c in own), T * b
        teacher = (
            Term(
                "teacher",
                12 * T * N * S * DISTILL_TOPK,
                f"{T} specialists' top-{DISTILL_TOPK} log-probabilities and ids, {N} windows x seqlen {S} each",
                ("calibration nsamples", "calibration seqlen"),
            ),
        )
    D = int(hf.get("hidden_size", hf.get("n_embd", 0)))
    A = int(hf.get("num_attention_heads", hf.get("n_head", 0)))
    V, L = int(hf.get("vocab_size", 0)), num_layers_of(hf)
    return MemoryEstimate(
        (
            Term(
                "models",
                F32 * (2 * T + 2) * params,
                f"float32 base, {T} models, their task vectors and the merged model ({params} parameters each)",
                ("the number of models",),
            ),
            Term(
                "activations",
                F32 * b * S * (D * (L + 1) + 3 * V) + F32 * 2 * A * b * S * S,
                f"batch_size {b} x seqlen {S}: block inputs, logits (vocabulary {V}), attention scores",
                ("batch_size", "calibration seqlen"),
            ),
            *teacher,
        ),
        "formula: 4 (2T + 2) P + 4 b S (D (L + 1) + 3 V) + 8 A b S^2 bytes (the learning pass, float32)",
    )


def estimate_calibrated(
    shapes: ModelShapes,
    *,
    tasks: int,
    sets: Sequence[CalibrationShape],
    batch_size: int = 8,
    per_task: bool = False,
    budget: int = DEFAULT_MEMORY_BUDGET,
    streamed: bool = True,
) -> MemoryEstimate:
    """The module-doc formula of a block-by-block merge from numbers alone (no checkpoint needed).

    `tasks`: T fine-tuned models; `sets`: the calibration sets the Hessian source runs (one for
    `merged` / `base`, one per model for `per_task`; none when no tensor uses calibration data);
    `per_task`: one Hessian per model (k = T); `budget`: `memory_budget`; `streamed`: the
    tensors outside the blocks merge in row chunks (`streaming.why_not_streamed`)."""
    T, hidden, heads, linears = tasks, shapes.hidden, shapes.heads, shapes.linears
    use_data = bool(sets)
    k = T if per_task else 1
    tokens = [c.nsamples * c.seqlen for c in sets]
    activations = F32 * hidden * (sum(tokens) + max(tokens, default=0))
    attention = F32 * 2 * heads * max((min(batch_size, c.nsamples) * c.seqlen**2 for c in sets), default=0)
    hessians = F32 * k * sum(w.cols**2 for w in linears) if use_data else 0
    obs = F32 * max((3 * T * w.rows * w.cols + 3 * k * w.cols**2 for w in linears), default=0) if use_data else 0
    seqlens = sorted({c.seqlen for c in sets})
    n, per = shapes.outer, bytes_per_entry(T)
    merge_outer = (min(n * per, max(budget, shapes.outer_row * per)) if streamed else n * per) + F32 * n
    outer = max(merge_outer, F32 * n * k if use_data else 0)
    return MemoryEstimate(
        (
            Term(
                "activations",
                activations,
                f"{len(sets)} calibration stream(s) x nsamples x seqlen x hidden {hidden}",
                ("calibration nsamples", "calibration seqlen"),
            ),
            Term(
                "attention",
                attention,
                f"batch_size {batch_size} x {heads} heads x seqlen^2 (seqlen {seqlens})",
                ("calibration seqlen", "batch_size"),
            ),
            Term(
                "hessians",
                hessians,
                f"{len(linears)} linear inputs per block" + (" per model" if per_task else ""),
                ("hessian_source (per_task keeps one Hessian per model)",),
            ),
            Term("obs", obs, "the largest linear layer's OBS problem over all models", ("the number of models",)),
            Term(
                "block",
                F32 * (T + 1) * shapes.block_params,
                f"one block of the base and {T} models",
                ("the number of models",),
            ),
            Term(
                "outer",
                outer,
                "the largest tensor outside the blocks: its merge within memory_budget "
                + ("(row chunks)" if streamed else "(whole)")
                + ", or the embeddings calibration holds",
                ("memory_budget", "the number of models"),
            ),
        )
    )


def available_bytes() -> int | None:
    """Memory this process can still use: MemAvailable of /proc/meminfo, else the free pages; None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def refuse_if_too_big(est: MemoryEstimate, available: int | None) -> None:
    """`ResourceError` naming the largest term's knobs when the estimate exceeds `available` bytes."""
    if available is None or est.total <= available:
        return
    top = est.largest()
    knobs = list(dict.fromkeys(k for t in top[:2] for k in t.knobs))
    raise ResourceError(
        f"the merge needs about {human(est.total)} of memory but {human(available)} is available: "
        + "; ".join(f"{t.name} {human(t.bytes)} ({t.detail})" for t in top)
        + f". Lower {' / '.join(knobs)}, or pass --force to try anyway"
    )


def _estimate_mapped(cfg: MergeConfig) -> MemoryEstimate | None:
    """The memory estimate of a mapped config (slices, re-indexed vocabularies), or None when the usual one applies.

    Mapped tensors are merged whole: `N (12 + 20 T)` bytes with T the tensor's merged
    sources, N (copies: N float32 entries, read once).
    """
    planned = headers_plan(cfg)
    if planned is None:
        return None
    worst, what = 0, "no tensor"
    for e in planned[0].entries:
        tasks = (len(e.readers) if e.readers else len(cfg.models) + 1) - 1
        need = whole_tensor_bytes(e.shape, tasks) if e.action == MERGE else F32 * math.prod(e.shape)
        if need > worst:
            worst, what = need, f"{e.name} {list(e.shape)}"
    formula = (
        "formula: max over tensors of N*(12 + 20 T) bytes (N entries, T merged sources; mapped tensors merge whole)"
    )
    return MemoryEstimate(
        (Term("tensor", worst, f"the largest merge working set: {what}", ("the number of models",)),),
        formula,
    )
