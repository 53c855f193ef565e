"""The block-by-block merge behind `sgtv merge CONFIG OUT`: the driver.

    embeddings, final norm, untied head: merged data-free (the method's own trim)
    hessian source starts its calibration streams (sources.py)
    for each block i:
        read block i of the base and of every fine-tuned model (one block in memory)
        H of every linear layer some model changed, from the source's streams (one H per input group)
        per tensor: plan (planning.py) -> merge_planned (sgtv_jax.merge.plan):
            trim every model's task vector [T, out, in] with the shared H, then merge
        the source moves its streams on (e.g. through the merged block)
    atomic export (HF dir or Orbax) with the report and its plot (report.py)

A tensor's result equals `sgtv_jax.merge.plan.merge_planned` of its plan with
the same Hessian. Tensors that no model changed are the base tensor.

`run_merge` reads planner -> executor: its `_driver` sends merges that need no
calibration data to the by-name merge of `datafree.py` (any architecture,
tensor by tensor) and the others here; `export_run.export` writes the result.
The rules every driver shares (unchanged tensors, report rows, errors): `driver.py`.

A merge that needs no calibration data runs by tensor name on any
architecture (`datafree.DataFreeRun`; `uses_by_name` says when); Orbax
output then needs the base's Flax family and unchanged parameter set, and
is refused otherwise. A merge that needs calibration data runs block by
block (`MergeRun`) and needs a Flax family of the base's architecture,
on `run_merge`'s `mesh` (None: `mesh.make_mesh(cfg.devices)`). Under `jax.distributed`
(`mesh.init_distributed`) every process calls `run_merge` with the same config:
process 0 checks and writes `out`; the others run the calibrated merge
with it (their devices hold their share of the calibration windows),
write nothing, and return its report; a merge without calibration data
runs on process 0 alone. A method that learns its weights (`adamerging`)
first runs its learning pass on process 0 (`adamerge.learn_weights`: Flax
family needed), then merges by name with the learned weights; the report
holds them under "adamerging", its "config" the config as given.

A calibrated merge runs on a device mesh (`mesh.py`; the config's `devices`,
all devices of every process by default): calibration is data-parallel over
it (the same Hessians bit for bit on any mesh, `streams.HessianSum`), OBS
runs on one device of each process (a row split would change the rounding of
its matmuls, and so the kept entries), and under `jax.distributed` every
process runs the merge while process 0 alone writes the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from convert.conversion import source_dtype
from convert.dtypes import parse_dtype
from convert.expert_layout import fuse_expert_files
from convert.lora_extract import write_merged_adapter
from convert.model_card import render_model_card
from sgtv_jax.merge.plan import MergeInfo, ObsOptions, TensorPlan, merge_planned
from sgtv_jax.merge.trim import Calibration
from sgtv_jax.pipeline.adamerge import learn_weights
from sgtv_jax.pipeline.arch import arch_of
from sgtv_jax.pipeline.byname import MERGE, TensorEntry
from sgtv_jax.pipeline.calibration import load_calibration, load_tokenizer
from sgtv_jax.pipeline.card import merge_card
from sgtv_jax.pipeline.check import max_positions_of
from sgtv_jax.pipeline.checkpoints import Checkpoints
from sgtv_jax.pipeline.config import ConfigError, MergeConfig
from sgtv_jax.pipeline.datafree import (
    DataFreeRun,
    checkpoint_inputs,
    merge_entry,
    require_flax_family,
    uses_by_name,
)
from sgtv_jax.pipeline.driver import (
    merged_record,
    task_vectors,
    translated,
    unchanged,
    unchanged_record,
    untouched_linear,
)
from sgtv_jax.pipeline.export_run import FORMATS, check_output_and_config, check_request, export, follow, merge_inputs
from sgtv_jax.pipeline.lapack_threads import with_one_lapack_thread
from sgtv_jax.pipeline.mapped import mapped_run, saves_tokenizer, write_output_files
from sgtv_jax.pipeline.mesh import describe, make_mesh
from sgtv_jax.pipeline.planning import plan_tensor
from sgtv_jax.pipeline.report import (
    PLOT_FILE,
    REPORT_FILE,
    STAGES,
    LayerRecord,
    StageTimer,
    jsonable,
    kept_densities,
    peak_rss_mb,
    plot_report,
    relative_errors,
    with_export_time,
)
from sgtv_jax.pipeline.report_html import write_reports
from sgtv_jax.pipeline.sources import make_source
from sgtv_jax.pipeline.tokenizer import output_chat_template

__all__ = [
    "FORMATS",
    "PLOT_FILE",
    "REPORT_FILE",
    "STAGES",
    "LayerRecord",
    "MergeRun",
    "merge_inputs",
    "merge_tensor",
    "peak_rss_mb",
    "plot_report",
    "run_merge",
]


def merge_tensor(
    method: str,
    deltas: jax.Array,
    *,
    name: str,
    hessian: jax.Array | None = None,
    plan: TensorPlan | None = None,
    base: jax.Array | None = None,
    **fields: Any,
) -> tuple[jax.Array, jax.Array, MergeInfo]:
    """Merge one tensor's task vectors `deltas` `[T, ...]` (2-D ones `[out, in]`) with `merge_planned`.

    The driver's one call per tensor. Give its `plan` (for `method` and
    `name`), or the plan's fields as keywords: weights, densities, trim,
    params, seed, gamma, epsilon and the `ObsOptions` fields (blocksize,
    percdamp, prunen, prunem, refit). `hessian`: `[in, in]`, `[T, in, in]` or
    None; `base`: the base tensor in the layout of one task vector (methods on
    whole weights read it). Returns (merged task vector, trimmed stack, `MergeInfo`).
    """
    if plan is None:
        obs = ObsOptions(**{k: fields.pop(k) for k in ObsOptions._fields if k in fields})
        plan = TensorPlan(method, name, obs=obs, **fields)
    elif fields or (plan.method, plan.name) != (method, name):
        raise TypeError("merge_tensor: give a plan for this method and name, or its fields, not both")
    return merge_planned(plan, deltas, Calibration(hessian=hessian) if hessian is not None else None, base=base)


class MergeRun:
    """One merge (see module doc). Use `run_merge`; attributes hold the report after `tensors()`.

    Args:
      cfg: a validated `MergeConfig`.
      hessian_sink: optional dict filled with `{hf_tensor_name: H}` (numpy,
        `[in, in]` or `[T, in, in]`) for every linear layer, for tests/analysis.
      progress: show a tqdm bar per block.
      mesh: the devices (`mesh.make_mesh`); None: `make_mesh(cfg.devices)`.
    """

    def __init__(
        self,
        cfg: MergeConfig,
        *,
        hessian_sink: dict[str, np.ndarray] | None = None,
        progress: bool = True,
        mesh: Mesh | None = None,
    ) -> None:
        self.cfg = cfg
        self.sink = hessian_sink
        self.progress = progress
        self.mesh = mesh if mesh is not None else make_mesh(cfg.devices)
        self.timer = StageTimer()
        with self.timer("load"):
            self.ckpts = Checkpoints(cfg)
            self.arch = arch_of(self.ckpts.base)
            self.out_dtype_name = cfg.dtype or source_dtype(self.ckpts.base)
            self.out_dtype = parse_dtype(self.out_dtype_name)
        self.records: list[LayerRecord] = []
        self.T = len(cfg.models)
        use_data = any(cfg.calibration_for(t) is not None for t in range(self.T))
        if use_data:
            self.arch.require_input_groups()  # refuse before any calibration work
        self.source = (
            make_source(
                cfg.hessian_source,
                self.arch,
                cfg.batch_size,
                cfg.moe_min_tokens,
                mesh=self.mesh,
                accumulation=cfg.hessian_accumulation,
            )
            if use_data
            else None
        )
        self.calib_tokens = 0

    @property
    def base(self) -> Any:
        return self.ckpts.base

    @property
    def models(self) -> list[Any]:
        return self.ckpts.models

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """The merged model, HF name by HF name, block by block (lazy: drives the whole merge)."""
        layout = self.arch.layout(list(self.ckpts.base.names()))
        merged_outer = {n: self._merge_outer(n, layout.rules[n].transpose) for n in layout.outer}
        yield from merged_outer.items()
        if self.source is not None:
            self._start_source(layout.outer, merged_outer)
        del merged_outer
        with tqdm(total=self.arch.num_layers, desc="merge", unit="block", disable=not self.progress) as bar:
            for i, names in enumerate(layout.blocks):
                yield from self._merge_block(i, names, layout.rules)
                bar.update(1)

    def _merge_outer(self, name: str, torch_layout: bool) -> np.ndarray:
        """A tensor outside the blocks (embeddings, final norm, head): merged data-free by the
        data-free merge's own `merge_entry`, so one over `memory_budget` is merged in row chunks
        (a `[T, 128256, 2048]` float32 embedding stack alone is 3 GB per model)."""
        shape = tuple(self.ckpts.base.shape(name))
        entry = TensorEntry(
            name,
            MERGE,
            shape,
            sources=(name,) * (self.T + 1),
            depth=self.arch.num_layers,
            transpose=len(shape) == 2 and not torch_layout,
        )
        out, rec = merge_entry(
            self.cfg, entry, checkpoint_inputs(self.ckpts, entry.sources), self.out_dtype, self.timer
        )
        self.records.append(rec)
        return cast(np.ndarray, out)

    def _start_source(self, outer: list[str], merged_outer: dict[str, np.ndarray]) -> None:
        assert self.source is not None  # called only when the merge uses calibration data
        with self.timer("calibrate"):
            tok = load_tokenizer(self.cfg.base_model)
            maxpos = max_positions_of(self.arch.hf_config)
            # None: a model without data (per_task with proxy Grams), zero Hessians
            sets = [None if c is None else load_calibration(c, tok, maxpos) for c in self.source.datasets(self.cfg)]
            self.calib_tokens = sum(s.tokens for s in sets if s is not None)
            self.source.start(sets, self.source.embedding_tensors(self.ckpts, outer, merged_outer))

    def _merge_block(self, i: int, names: list[str], rules: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
        with self.timer("load"):
            base, fts = self.ckpts.read_base(names), self.ckpts.read_models(names)
        hess: dict[str, jax.Array] = {}
        tokens: dict[str, list[int]] = {}
        fallback: dict[str, list[bool]] = {}
        prefix = self.arch.prefix(i)
        untouched: set[str] = set()
        if self.source is not None:
            if self.sink is None:  # a sink wants every H
                untouched = untouched_linear(self.cfg, self.arch, i, base, fts)
            with self.timer("calibrate"):
                hess, tokens, fallback = self.source.hessians(i, base, fts, skip=untouched)
                jax.block_until_ready(list(hess.values()))
        merged = {}
        for n in names:
            local = n[len(prefix) :]
            weight, layer = local.endswith(".weight") and base[n].ndim == 2, local.removesuffix(".weight")
            h = hess.get(layer) if weight else None  # a linear layer's weight
            if h is not None and self.sink is not None:
                self.sink[n] = np.asarray(h)
            stats = None if h is None else dict(hessian_tokens=tokens[layer], hessian_fallback=fallback[layer])
            linear = h is not None or (weight and layer in untouched)
            merged[n] = self._merge_one(n, i, base[n], [f[n] for f in fts], h, rules[n].transpose, stats, linear)
        if self.source is not None:
            with self.timer("calibrate"):
                self.source.after_block(i, merged)
        del base, fts
        for n in names:
            yield n, merged[n]

    def _merge_one(
        self,
        name: str,
        layer: int | None,
        base: np.ndarray,
        fts: Sequence[np.ndarray] | Callable[[int], np.ndarray],
        hessian: jax.Array | None,
        torch_layout: bool,
        hessian_stats: dict[str, Any] | None,
        linear: bool,
    ) -> np.ndarray:
        """Merge one tensor; returns the merged tensor in the output dtype (HF layout).

        `fts`: model t's tensor, as a list or a reader `t -> array` (then only
        one raw tensor is alive at a time: the peak memory is an embedding's).
        `hessian_stats`: the report's `hessian_tokens` / `hessian_fallback` of a calibrated layer.
        `linear`: planned as a linear layer (one no model changed has no `hessian`: `untouched_linear`).
        """
        t0 = time.perf_counter()
        b = np.asarray(base, dtype=np.float32)
        deltas = task_vectors(b, fts, self.T)
        transpose = base.ndim == 2 and not torch_layout
        if transpose:
            deltas = jnp.swapaxes(deltas, 1, 2)
        plan = plan_tensor(self.cfg, name, layer, self.arch.num_layers, linear=linear)
        record = dict(
            name=name,
            block=layer,
            linear=linear,
            shape=tuple(base.shape),
            density=list(plan.densities),
            **(hessian_stats or {}),
        )
        with self.timer("prune"):
            same = unchanged(plan, deltas)
            if not same:
                merged, trimmed, info = self._merge_planned(plan, deltas, hessian, b.T if transpose else b)
        if same:  # the base tensor is the result (`driver.unchanged`)
            self.records.append(unchanged_record(record, self.T, t0))
            return b.astype(self.out_dtype)
        with self.timer("merge"):
            kept = [float(k) for k in np.asarray(kept_densities(trimmed))]
            trim_err = merge_err = None
            if hessian is not None and deltas.ndim == 3:
                te, me = relative_errors(
                    deltas,
                    None if trimmed is deltas else trimmed.astype(jnp.float32),  # RegMean: untrimmed
                    merged.astype(jnp.float32),
                    jnp.asarray(plan.weights, jnp.float32),
                    hessian,
                )
                trim_err, merge_err = [float(x) for x in te], float(me)
            if transpose:
                merged = merged.T
            out = np.asarray(b + np.asarray(merged, np.float32)).astype(self.out_dtype)
        self.records.append(merged_record(record, info, kept, t0, trim_err, merge_err))
        return out

    def _merge_planned(
        self, plan: TensorPlan, deltas: jax.Array, hessian: jax.Array | None, base: np.ndarray
    ) -> tuple[jax.Array, jax.Array, MergeInfo]:
        with translated(plan):
            merged, trimmed, info = merge_tensor(
                plan.method, deltas, name=plan.name, plan=plan, hessian=hessian, base=jnp.asarray(base)
            )
        return jax.block_until_ready(merged), trimmed, info

    def report(self, wall_s: float) -> dict[str, Any]:
        """The JSON report: config, stage times, peak RSS, one row per tensor."""
        rep = {
            "config": jsonable(self.cfg.to_dict()),
            "merge_path": "blocks",
            "model_type": self.arch.model_type,
            "num_layers": self.arch.num_layers,
            "hessian_source": self.cfg.hessian_source,
            "hessian_accumulation": self.cfg.hessian_accumulation,
            "mesh": describe(self.mesh),
            "calibration_tokens": self.calib_tokens,
            "output_dtype": self.out_dtype_name,
            "wall_s": wall_s,
            "stages_s": dict(self.timer.stages),
            "peak_rss_mb": peak_rss_mb(),
            "layers": [jsonable(dataclasses.asdict(r)) for r in self.records],
        }
        if self.source is not None:  # its rate beside a same-run matmul's (`calib_rate`)
            rep["calibrate"] = self.source.summary(self.timer.stages.get("calibrate", 0.0))
        return with_export_time(rep, wall_s)

    def close(self) -> None:
        self.ckpts.close()


class _Following(NamedTuple):
    """A calibrated merge this process takes part in without writing (`export_run.follow`)."""

    run: MergeRun


def _driver(
    cfg: MergeConfig,
    model_type: str,
    format: str,
    writer: bool,
    progress: bool,
    hessian_sink: dict[str, np.ndarray] | None,
    mesh: Mesh | None,
) -> tuple[MergeRun | DataFreeRun | _Following | dict[str, Any], str | None]:
    """The planner's choice of run driver for `cfg` (see `run_merge`), and the output chat template.

    Returns (the driver, or a `_Following` calibrated merge for a process that
    writes nothing, or the short report of a process with nothing to do; the template).
    """
    by_name = uses_by_name(cfg, model_type)
    if not by_name:
        require_flax_family(cfg, model_type)
    run: MergeRun | DataFreeRun
    idle = {"process": jax.process_index(), "written": False}
    if not writer and (by_name or not cfg.needs_calibration()):
        return idle, None  # nothing to share: process 0 merges
    mapped = mapped_run(cfg, by_name=by_name, progress=progress and writer)  # slices / re-indexed vocabulary
    if not writer and mapped is not None:
        mapped.close()
        return idle, None
    try:  # the chat template is read and checked before the first tensor is merged
        template = output_chat_template(cfg, saves_tokenizer=saves_tokenizer(mapped))
    except BaseException:
        if mapped is not None:
            mapped.close()
        raise
    if mapped is not None or by_name:
        run = mapped if mapped is not None else DataFreeRun(cfg, progress=progress)
        why = run.orbax_refusal() if format == "orbax" else None
        if why is not None:
            run.close()
            raise ConfigError(why)
    elif not writer:
        return _Following(MergeRun(cfg, hessian_sink=hessian_sink, progress=False, mesh=mesh)), template
    else:
        run = MergeRun(cfg, hessian_sink=hessian_sink, progress=progress, mesh=mesh)
    return run, template


@with_one_lapack_thread  # OpenBLAS threads fight XLA's (lapack_threads.py)
def run_merge(
    cfg: MergeConfig,
    out: str | Path,
    *,
    format: str = "hf",
    overwrite: bool = False,
    progress: bool = True,
    hessian_sink: dict[str, np.ndarray] | None = None,
    check: bool = True,
    lora_rank: int | None = None,
    mesh: Mesh | None = None,
    expert_layout: str = "per_expert",
) -> dict[str, Any]:
    """Merge as configured and write the result atomically to `out`; returns the report.

    Checks everything first, before any weights load: the output path
    (`convert.atomic.prepare_output`: `out` may not be, contain or lie inside
    any model or calibration file; an existing `out` is replaced only with
    `overwrite` and only if it is a previous output of this tool or empty) and
    the config (`sgtv_jax.pipeline.check.check_config`). `format`: "hf"
    (safetensors directory via `convert.export_hf`, with model card,
    `merge_report.json` and the error plot) or "orbax". A merge that fails or
    is killed leaves at most a hidden `.OUT.partial-*` directory (removed by
    the next run into `out`), never a complete-looking `out`. `lora_rank`
    (format "hf"): also write the merged task vector as a PEFT LoRA adapter of
    that rank in `out/adapter` (`convert.lora_extract`), part of the same
    atomic output. `expert_layout` "fused" (MoE models, format "hf") writes the
    experts in transformers 5's fused layout (`convert.expert_layout`).
    Which driver runs it, and how processes share it: the module doc.
    """
    check_request(cfg, format, lora_rank)
    out = Path(out)
    inputs, writer, model_type = check_output_and_config(cfg, out, format, overwrite, check, lora_rank, expert_layout)
    t0 = time.perf_counter()
    asked, learned = cfg, None
    if cfg.method_spec.learns_weights:
        # learn the weights (process 0), then merge by name with them (adamerge.py)
        require_flax_family(cfg, model_type)
        if not writer:
            return {"process": jax.process_index(), "written": False}
        learned = learn_weights(cfg, progress=progress)
        cfg = learned.config
    run, template = _driver(cfg, model_type, format, writer, progress, hessian_sink, mesh)
    if isinstance(run, dict):  # a process that writes nothing: its short report
        return run
    if isinstance(run, _Following):
        return follow(run.run, t0)
    box: dict[str, Any] = {}

    def finalize(tmp: Path) -> None:
        box["report"] = rep = run.report(time.perf_counter() - t0)
        if learned is not None:
            rep["config"] = jsonable(asked.to_dict())  # as the user wrote it; the merge's is derived
            rep["adamerging"] = learned.report
            rep["stages_s"]["learn"] = learned.seconds
            with_export_time(rep, time.perf_counter() - t0)
        write_reports(tmp, rep)  # merge_report.json and report.html
        plot_report(rep, tmp / PLOT_FILE)
        if format == "hf":  # the card names the config's models as written, and quotes the report's figures
            card = merge_card(asked, rep)
            (tmp / "README.md").write_text(render_model_card(card, json.loads((tmp / "config.json").read_text())))
        write_output_files(run, tmp, template)  # tokenizer (re-indexed vocabulary) and chat_template
        if lora_rank is not None:
            write_merged_adapter(tmp, run.base, lora_rank, cfg.base_model_written or cfg.base_model)
        if expert_layout == "fused":  # last: the adapter above is extracted against the base's per-expert names
            fuse_expert_files(tmp, cfg.max_shard_size)

    try:
        export(run, out, format, cfg, finalize=finalize, inputs=inputs, overwrite=overwrite)
    finally:
        run.close()
    rep = with_export_time(box["report"], time.perf_counter() - t0)
    with contextlib.suppress(OSError):  # final figures (export included), each file replaced atomically
        write_reports(out, rep)
    return rep
