"""The model card of a merge: the models as the config wrote them, the config to rerun, what was measured.

`merge_card` turns a config and its report into the dict `convert.model_card.
render_model_card` writes as README.md. Every model is named as the YAML
wrote it (`MergeConfig.written`, the labels), so a card holds an absolute path
of the merging machine only where the config had one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sgtv_jax.merge.paramspec import spec_values
from sgtv_jax.pipeline.config import MergeConfig
from sgtv_jax.pipeline.report import PLOT_FILE, REPORT_FILE
from sgtv_jax.pipeline.report_html import HTML_FILE

NOT_TRIMMED = (None, "unchanged")  # report rows of tensors copied or merged without a trim


_LOSS_NAMES = {"entropy": "entropy", "distill": "KL to the specialists"}
"""How the model card names AdaMerging's loss, by objective."""


def _trims(cfg: MergeConfig) -> list[str]:
    """The trims the config names (a per-tensor spec may name several), each once."""
    return list(dict.fromkeys(str(v) for v in spec_values(cfg.trim) if v))


def _per_model(values: Sequence[float], labels: Sequence[str], fmt: str) -> str:
    names = labels if len(labels) == len(values) else [f"model {i + 1}" for i in range(len(values))]
    return ", ".join(f"`{n}` {format(v, fmt)}" for n, v in zip(names, values))


def _weighted_means(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """Per model: the mean of `row[key][t]` over `rows`, weighted by each tensor's entries ([] if none has it)."""
    rows = [r for r in rows if r.get(key)]
    if not rows:
        return []
    tasks = min(len(r[key]) for r in rows)
    sizes = [math.prod(r.get("shape") or [1]) for r in rows]
    total = sum(sizes) or 1
    return [sum(r[key][t] * n for r, n in zip(rows, sizes)) / total for t in range(tasks)]


def summary(cfg: MergeConfig, report: Mapping[str, Any]) -> list[str]:
    """The card's prose: the method and trims, then the figures the report measured."""
    labels = [m.label for m in cfg.models]
    base = cfg.base_model_written or cfg.base_model
    trims = _trims(cfg)
    how = f"Merged {len(labels)} model{'s' if len(labels) != 1 else ''} onto `{base}` with `{cfg.merge_method}`"
    if trims:
        how += f", each task vector trimmed by {', '.join(f'`{t}`' for t in trims)}"
    tokens = int(report.get("calibration_tokens") or 0)
    if tokens:
        how += f" using {tokens} calibration tokens"
    out = [how + "."]
    ada = report.get("adamerging")
    if isinstance(ada, Mapping) and ada.get("losses"):
        out.append(
            f"The models' weights were learned by AdaMerging ({ada.get('steps')} steps, "
            f"{_LOSS_NAMES.get(ada.get('objective', 'entropy'), 'loss')} "
            f"{ada['losses'][0]:.4g} -> {ada['losses'][-1]:.4g})."
        )
    rows = [r for r in report.get("layers") or [] if r.get("trim") != "unchanged"]  # not: copied from the base
    trimmed = [r for r in rows if r.get("trim") not in NOT_TRIMMED]
    figures = f"{len(rows)} tensors merged, {len(trimmed)} of them trimmed"
    kept = _weighted_means(trimmed, "kept_density")
    if kept:
        figures += f"; entries kept of the trimmed tensors: {_per_model(kept, labels, '.1%')}"
    out.append(figures + ".")
    trim_err = _weighted_means(trimmed, "trim_error")
    merge_errs = [r["merge_error"] for r in rows if r.get("merge_error") is not None]
    if trim_err or merge_errs:
        errs = "Relative output error under the calibration Hessian (mean over tensors, by entries)"
        parts = [f"of each trimmed task vector {_per_model(trim_err, labels, '.3g')}"] if trim_err else []
        if merge_errs:
            parts.append(f"of the merge against task arithmetic {sum(merge_errs) / len(merge_errs):.3g}")
        out.append(errs + ": " + "; ".join(parts) + ".")
    # Times and memory differ from run to run: they stay in the report, so the same config
    # writes the same card (and the same output, byte for byte).
    out.append(
        f"Per-tensor figures, stage times and peak memory are in `{REPORT_FILE}`, plotted in `{PLOT_FILE}`; "
        f"`{HTML_FILE}` shows them all on one page."
    )
    return out


def merge_card(cfg: MergeConfig, report: Mapping[str, Any]) -> dict[str, Any]:
    """The README.md card of `cfg`'s merge (`render_model_card`'s keys), with `report`'s figures in prose."""
    return {
        "title": "Merged model",
        "method": " + ".join([cfg.merge_method, *_trims(cfg)]),
        "base_model": cfg.base_model_written or cfg.base_model,
        "models": [m.label for m in cfg.models],
        "tags": [cfg.merge_method],
        "summary": summary(cfg, report),
        "merge_config": cfg.written if cfg.written is not None else cfg.to_dict(),
    }
