"""The executor end of a merge run: the request's checks before any work, and the export of a run driver's tensors.

`sequential.run_merge` reads as planner -> executor: `check_request`, then
the output path and the config's checks, then the planner's choice of run
driver (`sequential._driver`), then `export` writes the driver's tensors
atomically (`convert.export`), with `finalize` adding the report files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from convert.atomic import prepare_output
from convert.chunked import ahead
from convert.expert_layout import check_expert_layout
from convert.export import export_hf
from sgtv_jax.pipeline.arch import arch_of
from sgtv_jax.pipeline.check import base_model_type, check_config
from sgtv_jax.pipeline.config import ConfigError, MergeConfig
from sgtv_jax.pipeline.datafree import DataFreeRun
from sgtv_jax.pipeline.mesh import is_writer
from sgtv_jax.pipeline.orbax_out import export_orbax
from sgtv_jax.pipeline.report import with_export_time

FORMATS = ("hf", "orbax")


def check_request(cfg: MergeConfig, format: str, lora_rank: int | None) -> None:
    """The output format, `--lora` rank and chat template asked of `run_merge`, checked before any work."""
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; one of {', '.join(FORMATS)}")
    if lora_rank is not None and (
        format != "hf" or isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1
    ):
        raise ConfigError(
            f"--lora {lora_rank!r}: the adapter's rank must be a positive integer, and it is written "
            "beside a Hugging Face model (--format hf)"
        )
    if format != "hf" and cfg.chat_template is not None:  # Orbax output carries no tokenizer files
        raise ConfigError(f"chat_template: --format {format} has no tokenizer_config.json to hold it; use --format hf")


def merge_inputs(cfg: MergeConfig) -> dict[str, str]:
    """Every path a merge reads, labelled by its config key: the output may overlap none of them."""
    inputs = {"base_model": cfg.base_model}
    for t, m in enumerate(cfg.models):
        inputs[f"models[{t}].model"] = m.model
        if m.adapter:
            inputs[f"models[{t}].adapter"] = m.adapter
        for k, f in enumerate(m.calibration.data if m.calibration is not None else ()):
            inputs[f"models[{t}].calibration.data[{k}]"] = f
    for k, f in enumerate(cfg.calibration.data if cfg.calibration is not None else ()):
        inputs[f"calibration.data[{k}]"] = f
    return inputs


def check_output_and_config(
    cfg: MergeConfig, out: Path, format: str, overwrite: bool, check: bool, lora_rank: int | None, expert_layout: str
) -> tuple[dict[str, str], bool, str]:
    """After `check_request`, before any weight loads: the output path (`prepare_output`, process 0) and the config
    (`check_config` when `check`, `--expert-layout`); the inputs by config key, whether this process writes, model_type."""
    inputs = merge_inputs(cfg)
    writer = is_writer()
    if writer:
        prepare_output(out, overwrite=overwrite, inputs=inputs)
    if check:
        check_config(cfg, lora_rank=lora_rank)
    model_type = base_model_type(cfg)
    check_expert_layout(expert_layout, format, model_type)
    return inputs, writer, model_type


def follow(run: Any, t0: float) -> dict[str, Any]:
    """A process other than 0: run the merge with process 0 (its collectives need every process), write nothing."""
    try:
        for _ in run.tensors():
            pass
        rep = with_export_time(run.report(time.perf_counter() - t0), time.perf_counter() - t0)
        return {**rep, "process": jax.process_index(), "written": False}
    finally:
        run.close()


def export(
    run: Any,
    out: Path,
    format: str,
    cfg: MergeConfig,
    *,
    finalize: Callable[[Path], None],
    inputs: dict[str, str],
    overwrite: bool,
) -> None:
    """Write the output tensors of `run` (a run driver) to `out` in `format`, atomically; `finalize(tmp)`
    adds the other files before the output is moved into place."""
    written: dict[str, Any] = dict(overwrite=overwrite, finalize=finalize, inputs=inputs)
    if format == "orbax":
        arch = arch_of(run.base) if isinstance(run, DataFreeRun) else run.arch
        export_orbax(run.tensors(), out, arch=arch, dtype=run.out_dtype, **written)
    elif isinstance(run, DataFreeRun):
        # every output tensor comes from the run (base copies included), with the plan's config
        base_dir = Path(run.base.path)
        copy_from = base_dir if base_dir.is_dir() else None
        written.update(config=run.plan.config, copy_files_from=copy_from)
        # merged in a worker thread while the tensors before are written (`ahead`: a few outputs in flight)
        with ahead(run.tensor_chunks()) as stream:
            export_hf(stream, out, dtype=run.out_dtype_name, max_shard_size=cfg.max_shard_size, **written)
    else:
        export_hf(
            run.tensors(), out, base=run.base, dtype=run.out_dtype_name, max_shard_size=cfg.max_shard_size, **written
        )
