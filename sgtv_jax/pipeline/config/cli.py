"""`sgtv schema`: print the JSON Schema of the merge YAML (from the declared model, `config.schema`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sgtv_jax.subcommand import subcommand


def schema_text() -> str:
    """The schema as `sgtv schema` prints it (2-space JSON, one trailing newline): docs/sgtv-merge.schema.json."""
    from sgtv_jax.pipeline.config.schema import json_schema

    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _run_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(schema_text())
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `schema` (sets `func`)."""
    subcommand(
        subparsers,
        "schema",
        _run_schema,
        help="print the JSON Schema of merge configs (for editors and CI validators)",
        description="Print the JSON Schema (draft 2020-12) of the merge YAML that `sgtv merge` and `sgtv check` "
        "read: every key, its type, default and range, method parameters per merge_method. Editors with "
        "the YAML language server validate and complete a config with the line "
        "'# yaml-language-server: $schema=PATH/sgtv-merge.schema.json' at its top (see docs/schema.md).",
    )
