"""`sgtv moe`: build a mixture-of-experts checkpoint from dense fine-tunes of one base (mergekit-moe's job).

`config` reads the YAML, `gates` holds the router rules, `routers` applies
them (``calibrated``: through the MoE itself), `build` writes the checkpoint.
Documented in docs/moe.md.

The names below load on first use: `sgtv` registers `moe.cli` with every
command, and importing `build` pulls in transformers (whose torch notice the
quiet guard must be in place for).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EXPERT_LAYOUTS", "MoeConfig", "load_moe_config", "run_moe"]
_HOME = {"EXPERT_LAYOUTS": "build", "run_moe": "build", "MoeConfig": "config", "load_moe_config": "config"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
