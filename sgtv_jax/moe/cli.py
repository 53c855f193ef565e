"""Subcommand `sgtv moe CONFIG OUT` (registered by `add_parser`); errors go through `sgtv_jax.cli`'s guard."""

from __future__ import annotations

import argparse
import json
from typing import Any

from sgtv_jax.subcommand import expert_layout_flag, overwrite_flag, subcommand


def _run_moe(args: argparse.Namespace) -> int:
    from sgtv_jax.moe import load_moe_config, run_moe

    cfg = load_moe_config(args.config)
    summary = run_moe(cfg, args.out, expert_layout=args.expert_layout.replace("-", "_"), overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), **summary}))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `moe` (sets `func`)."""
    p = subcommand(
        subparsers,
        "moe",
        _run_moe,
        help="build a Mixtral / Qwen2-MoE / Qwen3-MoE model from dense fine-tunes (mergekit-moe YAML)",
        description="Experts = each source model's MLP; attention, norms and embeddings from base_model; "
        "routers by gate_mode (hidden, cheap_embed, random, calibrated). See docs/moe.md.",
    )
    p.add_argument("config", help="mergekit-moe YAML config")
    p.add_argument("out", help="output directory (Hugging Face safetensors + config + tokenizer)")
    expert_layout_flag(
        p,
        "per-expert tensors (default; what transformers save_pretrained writes) or transformers 5's fused "
        "experts.gate_up_proj / experts.down_proj",
    )
    overwrite_flag(p, "replace OUT if it is a previous sgtv output")
