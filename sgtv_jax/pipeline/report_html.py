"""`report.html`: one self-contained page that shows a merge's `merge_report.json`.

`render_html(report)` turns the report (the dict a merge writes) into one HTML
page: no network (no scripts, no links, inline CSS), plots as inline SVG drawn
by matplotlib. Sections (each a `<section id=...>`, in this order): `summary`,
`skipped` (anything refused, skipped or fallen back), `errors` (relative
reconstruction error per trimmed linear layer and task, and of the merge),
`densities` (kept density per tensor and task, against the asked density),
`stages` (time per stage, wall time, peak memory), `mesh`, `config` (as YAML),
`layers` (the per-tensor table) and `other` (every top-level key not shown
above, as JSON, so nothing the report holds is hidden).

The same report gives the same bytes: SVG ids come from a fixed salt, the SVG
carries no date, numbers are formatted by fixed rules. The page shows the
report's times, so it is excluded from byte comparisons of merge outputs as
`merge_report.json` is.

`sgtv report OUT` (`load_report` + `write_report_html`) re-renders it from
`OUT/merge_report.json`; a merge writes both (`write_reports`), atomically.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import yaml
from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

from convert.atomic import write_file_atomic
from sgtv_jax.errors import SgtvError, short_repr
from sgtv_jax.pipeline.report import REPORT_FILE

HTML_FILE = "report.html"
# Fixed margins, not tight_layout: its extra layout pass was most of the page's rendering time.
WIDE = dict(left=0.09, right=0.99, top=0.97, bottom=0.13)
MARKERS_UP_TO = 500  # points per series drawn with markers (each one an SVG element); lines only above

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}pre{background:#f6f6f6;padding:.8em;overflow:auto}
figure{margin:.5em 0}figure svg{max-width:100%;height:auto}.note{color:#666}
"""

# Report keys the sections below show; every other top-level key goes to "other".
SHOWN = {
    "config",
    "merge_path",
    "model_type",
    "num_layers",
    "hessian_source",
    "hessian_accumulation",
    "calibration_tokens",
    "calibration_unused",
    "output_dtype",
    "wall_s",
    "stages_s",
    "peak_rss_mb",
    "memory_budget",
    "mesh",
    "layers",
    "not_streamed",
    "tensor_rules",
}


# --------------------------------------------------------------------------- reading


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(_number(x) for x in v)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# key -> (check, what it must be): the shape the renderer relies on (a merge writes more keys).
TOP_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "config": (lambda v: isinstance(v, dict), "a mapping"),
    "stages_s": (lambda v: isinstance(v, dict) and all(_number(x) for x in v.values()), "a mapping of seconds"),
    "mesh": (_opt(lambda v: isinstance(v, dict)), "a mapping or null"),
    "layers": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of mappings"),
    "wall_s": (_opt(_number), "a number"),
    "peak_rss_mb": (_opt(_number), "a number"),
    "not_streamed": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of mappings"),
    "tensor_rules": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of mappings"),
}
LAYER_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "density": (_opt(_numbers), "a list of numbers"),
    "kept_density": (_opt(_numbers), "a list of numbers"),
    "trim_error": (_opt(_numbers), "a list of numbers or null"),
    "merge_error": (_opt(_number), "a number or null"),
    "hessian_tokens": (_opt(_numbers), "a list of numbers or null"),
    "hessian_fallback": (_opt(lambda v: isinstance(v, list)), "a list or null"),
}


def check_report(report: Any, path: str | Path) -> dict[str, Any]:
    """`report` if it has the shape the page needs; SgtvError naming `path` and the key otherwise."""
    if not isinstance(report, dict):
        raise SgtvError(f"{path}: not a merge report (a JSON object), got {short_repr(report)}")
    for key, (ok, what) in TOP_KEYS.items():
        if key in report and not ok(report[key]):
            raise SgtvError(f"{path}: {key}: must be {what}, got {short_repr(report[key])}")
    for i, row in enumerate(report.get("layers") or []):
        for key, (ok, what) in LAYER_KEYS.items():
            if (key in row or key == "name") and not ok(row.get(key)):
                raise SgtvError(f"{path}: layers[{i}].{key}: must be {what}, got {short_repr(row.get(key))}")
    return report


def load_report(out_dir: str | Path) -> dict[str, Any]:
    """`OUT/merge_report.json`, checked; SgtvError naming the file when it is missing or corrupt."""
    out = Path(out_dir)
    path = out / REPORT_FILE
    if not out.is_dir():
        what = "not a directory" if out.exists() else "not found"
        raise SgtvError(f"{out}: {what}; give the output folder of `sgtv merge` (it holds {REPORT_FILE})")
    if not path.is_file():
        raise SgtvError(f"{path}: not found; `sgtv report` reads the {REPORT_FILE} that `sgtv merge` writes into OUT")
    try:
        report = json.loads(path.read_bytes())
    except UnicodeDecodeError as e:
        raise SgtvError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise SgtvError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return check_report(report, path)


# --------------------------------------------------------------------------- plots


def _svg(fig: Figure, name: str) -> str:
    """`fig` as an inline `<svg>` element: no XML prolog or metadata, ids salted by `name` (unique per page)."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"sgtv-report-{name}", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    # the RDF <metadata> block names the image type by URL; the page has no use for it
    return re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg") :], count=1, flags=re.S)


def _matrix(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """`[len(rows), T]` float64 of each row's list `key`, NaN where a row has fewer entries or none."""
    lists = [r.get(key) or [] for r in rows]
    out = np.full((len(rows), max((len(v) for v in lists), default=0)), np.nan)
    for i, v in enumerate(lists):
        out[i, : len(v)] = [np.nan if x is None else x for x in v]
    return out


def _block_ticks(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """x ticks at the first tensor of each block (at most 16 labelled), x label saying so."""
    firsts: dict[Any, int] = {}
    for i, r in enumerate(rows):
        firsts.setdefault(r.get("block"), i)
    blocks = [(b, i) for b, i in firsts.items() if isinstance(b, int)]
    step = max(1, math.ceil(len(blocks) / 16))
    ax.set_xticks([i for _, i in blocks[::step]], [str(b) for b, _ in blocks[::step]])
    ax.set_xlabel("tensor, in report order (ticks: first tensor of each block)")


def _series(ax: Any, x: np.ndarray, y: np.ndarray, gid: str, **kw: Any) -> None:
    marker = "." if len(x) <= MARKERS_UP_TO else None
    (line,) = ax.plot(x, y, marker=marker, lw=0.8, **kw)
    line.set_gid(gid)  # the SVG group's id: the series can be found in the page


def error_figure(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """SVG: per trimmed linear layer, each task's trim error and the merge error (log scale)."""
    fig = Figure(figsize=(11, 4.2))
    ax = fig.subplots(gridspec_kw=WIDE)
    te = _matrix(rows, "trim_error")
    me = np.asarray([np.nan if r.get("merge_error") is None else r["merge_error"] for r in rows], float)
    x = np.arange(len(rows))
    for t in range(te.shape[1]):
        _series(ax, x, te[:, t], f"errors-trim-{t}", label=f"trim error, {_label(labels, t)}")
    _series(ax, x, me, "errors-merge", color="k", label="merge error vs sum w_t D_t")
    values = np.concatenate([te.ravel(), me])
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size and np.all(values[np.isfinite(values)] > 0):
        ax.set_yscale("log")
    elif positive.size:  # a zero error (density 1) has no log: linear below the smallest positive one
        ax.set_yscale("symlog", linthresh=float(positive.min()))
    _block_ticks(ax, rows)
    ax.set_ylabel("relative reconstruction error")
    ax.legend(fontsize=7, loc="best")
    return _svg(fig, "errors")


def density_figure(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """SVG: per tensor, the density kept of each task's task vector (dots) and the asked one (dashed)."""
    fig = Figure(figsize=(11, 4.2))
    ax = fig.subplots(gridspec_kw=WIDE)
    kept, asked = _matrix(rows, "kept_density"), _matrix(rows, "density")
    x = np.arange(len(rows))
    for t in range(kept.shape[1]):
        color = f"C{t % 10}"
        _series(ax, x, kept[:, t], f"densities-kept-{t}", color=color, label=f"kept, {_label(labels, t)}")
        if t < asked.shape[1]:
            (line,) = ax.plot(x, asked[:, t], "--", color=color, lw=0.8, label=f"asked, {_label(labels, t)}")
            line.set_gid(f"densities-asked-{t}")
    ax.set_ylim(-0.02, 1.02)
    _block_ticks(ax, rows)
    ax.set_ylabel("density (fraction of entries kept)")
    ax.legend(fontsize=7, loc="best")
    return _svg(fig, "densities")


def stage_figure(stages: dict[str, float]) -> str:
    """SVG: seconds per stage as horizontal bars (one bar per stage, in the report's order)."""
    names = list(stages)
    height = 0.45 * len(names) + 0.9
    fig = Figure(figsize=(8, height))
    ax = fig.subplots(gridspec_kw=dict(left=0.13, right=0.97, top=1 - 0.15 / height, bottom=0.6 / height))
    bars = ax.barh(range(len(names)), [stages[n] for n in names], color="C0")
    for name, bar in zip(names, bars):
        bar.set_gid(f"stages-{name}")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.bar_label(bars, labels=[_fmt(stages[n]) + " s" for n in names], fontsize=8, padding=3)
    ax.set_xlabel("seconds")
    ax.margins(x=0.15)
    return _svg(fig, "stages")


# --------------------------------------------------------------------------- HTML


def _fmt(v: Any) -> str:
    """A value as the page shows it: numbers to 4 significant digits, lists joined, null as a dash."""
    if v is None:
        return "\u2013"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _some(values: Any, shown: int = 20) -> str:
    """`values` counted, the first `shown` of them listed: "3: a, b, c" or "500: a, ... and 480 more"."""
    values = [str(v) for v in values] if isinstance(values, (list, dict)) else [str(values)]
    more = f" and {len(values) - shown} more" if len(values) > shown else ""
    return f"{len(values)}: {', '.join(values[:shown])}{more}"


def _label(labels: Sequence[str], t: int) -> str:
    return labels[t] if t < len(labels) else f"model {t}"


def _e(v: Any) -> str:
    return html.escape(_fmt(v) if not isinstance(v, str) else v, quote=True)


def _table(rows: Sequence[Sequence[Any]], head: Sequence[str] | None = None) -> str:
    """An HTML table; cells holding numbers are right-aligned."""
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = (f'<td class="n">{_e(c)}</td>' if _number(c) else f"<td>{_e(c)}</td>" for c in row)
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _summary(rep: dict[str, Any], layers: list[dict[str, Any]]) -> str:
    cfg = rep.get("config") or {}
    facts = [
        ("merge method", cfg.get("merge_method")),
        ("trim", cfg.get("trim")),
        ("models", len(cfg.get("models") or [])),
        ("base model", cfg.get("base_model")),
        ("architecture", rep.get("model_type")),
        ("merge path", rep.get("merge_path")),
        ("decoder layers", rep.get("num_layers")),
        ("Hessian source", rep.get("hessian_source") if rep.get("calibration_tokens") else None),
        ("Hessian accumulation", rep.get("hessian_accumulation")),
        ("calibration tokens", rep.get("calibration_tokens")),
        ("output dtype", rep.get("output_dtype")),
        ("tensors", len(layers)),
        ("wall time, s", rep.get("wall_s")),
        ("peak memory (RSS), MiB", rep.get("peak_rss_mb")),
    ]
    return _table([(k, v) for k, v in facts if v is not None])


def _stages(rep: dict[str, Any]) -> str:
    stages = rep.get("stages_s") or {}
    if not stages:
        return _note("the report holds no stage times")
    rows = [(k, v) for k, v in stages.items()] + [("wall time", rep.get("wall_s"))]
    rows.append(("peak memory (RSS), MiB", rep.get("peak_rss_mb")))
    if rep.get("memory_budget") is not None:
        rows.append(("memory budget per tensor, bytes", rep["memory_budget"]))
    return f'<figure id="stages-plot">{stage_figure(stages)}</figure>\n' + _table(rows, ("stage", "seconds"))


def _skipped(rep: dict[str, Any], layers: list[dict[str, Any]], labels: Sequence[str]) -> str:
    """One list item per thing refused, skipped or fallen back (the report's own words where it has them)."""
    items = []
    if rep.get("calibration_unused"):
        items.append("calibration data was given, but this merge needs none: it was not read")
    for r in rep.get("not_streamed") or []:
        items.append(f"{r.get('name')}: over the memory budget, merged whole ({r.get('why')})")
    for r in rep.get("tensor_rules") or []:
        items.append(f"{r.get('tensor')}: {r.get('rule')} ({r.get('detail')})")
    tok = rep.get("tokenizer")
    tok = tok if isinstance(tok, dict) else {}
    if tok.get("no_source"):
        items.append(f"tokens no model has (rows filled): {_some(tok['no_source'])}")
    if tok.get("models_without_tokenizer"):
        items.append(f"models without a tokenizer (the base's assumed): {_some(tok['models_without_tokenizer'])}")
    for r in layers:
        for t, fell in enumerate(r.get("hessian_fallback") or []):
            if fell:
                tokens = (r.get("hessian_tokens") or [None] * (t + 1))[t]
                items.append(
                    f"{r['name']}: {_label(labels, t)}'s Hessian saw {_fmt(tokens)} routed tokens, "
                    "too few: the all-token Hessian was used"
                )
    unchanged = [r["name"] for r in layers if r.get("trim") == "unchanged"]
    if unchanged:
        items.append(f"tensors no model changed, copied from the base: {_some(unchanged)}")
    if not items:
        return _note("nothing was refused, skipped or fallen back")
    return "<ul>\n" + "\n".join(f"<li>{html.escape(i)}</li>" for i in items) + "\n</ul>"


LAYER_COLUMNS = ("name", "block", "shape", "trim", "density", "kept_density", "damping", "trim_error", "merge_error")


def _layers_table(layers: list[dict[str, Any]]) -> str:
    rows = [[r.get(c) for c in LAYER_COLUMNS] + [r.get("time_s")] for r in layers]
    head = [c.replace("_", " ") for c in LAYER_COLUMNS] + ["time, s"]
    return f"<details open><summary>{len(layers)} tensors</summary>\n{_table(rows, head)}\n</details>"


def _plots(layers: list[dict[str, Any]], labels: Sequence[str]) -> tuple[str, str]:
    """The bodies of the errors and densities sections."""
    calibrated = [r for r in layers if r.get("trim_error") is not None]
    if calibrated:
        errors = f'<figure id="errors-plot">{error_figure(calibrated, labels)}</figure>'
        errors += _note(
            f"{len(calibrated)} trimmed linear layers; trim error tr(E H E^T) / tr(D H D^T) per task, "
            "merge error against the task-arithmetic target, both under the calibration Hessian"
        )
    else:
        errors = _note("no calibration data: no reconstruction errors")
    with_density = [r for r in layers if r.get("kept_density")]
    if with_density:
        densities = f'<figure id="densities-plot">{density_figure(with_density, labels)}</figure>'
    else:
        densities = _note("no tensor reports a kept density")
    return errors, densities


def render_html(report: dict[str, Any]) -> str:
    """The page for `report` (a merge report, as `check_report` accepts); same report, same text."""
    layers = list(report.get("layers") or [])
    cfg = report.get("config") or {}
    models = cfg.get("models")
    models = models if isinstance(models, list) else []
    labels = [str(m.get("model")) if isinstance(m, dict) else str(m) for m in models]
    errors, densities = _plots(layers, labels)
    mesh = report.get("mesh")
    other = {k: v for k, v in report.items() if k not in SHOWN}
    title = f"sgtv merge report: {cfg.get('merge_method', '?')}"
    parts = [
        _section("summary", "Summary", _summary(report, layers)),
        _section("skipped", "Refused, skipped or fallen back", _skipped(report, layers, labels)),
        _section("errors", "Reconstruction errors per layer", errors),
        _section("densities", "Densities per tensor and task", densities),
        _section("stages", "Stage times and memory", _stages(report)),
        _section(
            "mesh",
            "Device mesh",
            _table(list(mesh.items())) if mesh else _note("no device mesh: this merge ran without calibration"),
        ),
        _section("config", "Config", f"<pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>"),
        _section("layers", "Per-tensor figures", _layers_table(layers)),
        _section(
            "other",
            "Other report fields",
            f"<pre>{html.escape(json.dumps(other, indent=1, sort_keys=True))}</pre>" if other else _note("none"),
        ),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def write_report_html(out_dir: str | Path, report: dict[str, Any]) -> Path:
    """Render `report` into `out_dir/report.html`, atomically (a reader sees the old page or the new)."""
    return write_file_atomic(Path(out_dir) / HTML_FILE, render_html(report).encode("utf-8"))


def write_reports(out_dir: str | Path, report: dict[str, Any]) -> None:
    """`merge_report.json` and `report.html` into `out_dir`, each written atomically."""
    text = json.dumps(report, indent=1) + "\n"
    write_file_atomic(Path(out_dir) / REPORT_FILE, text.encode("utf-8"))
    write_report_html(out_dir, json.loads(text))  # as `sgtv report` reads it: the same page, byte for byte
