"""`sgtv report OUT`: render OUT/merge_report.json as OUT/report.html (`pipeline.report_html`).

Registered at start-up, so this module imports nothing heavy: the renderer
(matplotlib, JAX through `pipeline.report`) loads only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from sgtv_jax.subcommand import subcommand


def _run_report(args: argparse.Namespace) -> int:
    from sgtv_jax.pipeline.report_html import load_report, write_report_html  # noqa: PLC0415 - heavy: only when run

    page = write_report_html(args.out, load_report(args.out))
    print(f"wrote {page}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `report` (sets `func`)."""
    p = subcommand(
        subparsers,
        "report",
        _run_report,
        help="render a merge's merge_report.json as one self-contained HTML page",
        description="Read OUT/merge_report.json (written by `sgtv merge`) and write OUT/report.html: "
        "config, per-layer errors and densities as plots, stage times, peak memory, mesh, anything "
        "refused or skipped. No network: inline CSS and SVG. A merge writes the same page itself.",
    )
    p.add_argument("out", help="the output folder of `sgtv merge` (holds merge_report.json)")
