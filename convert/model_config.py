"""Checks of the numbers in a model config: sizes and counts, and the shapes they must agree on.

A model directory's ``config.json``, an Orbax checkpoint's ``sgtv_model.json``
(its ``hf_config``) and the config built from GGUF metadata are read by us
before transformers sees them (if it ever does): a head count of 0 or a string
would otherwise fail deep inside model building (ZeroDivisionError, TypeError). `check_model_config` checks each field with `sgtv_jax.numparse`
and the shapes they must agree on, and raises one ConvertError naming the file
and every bad key (values truncated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convert.errors import ConvertError
from sgtv_jax import numparse

POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "max_position_embeddings",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)
"""Sizes and counts that must be integers >= 1 when present (None: absent)."""

OPTIONAL_INTS = ("sliding_window", "shared_expert_intermediate_size")
"""Integers >= 0 when present (a sliding window of 0 or None means none). Token ids are not
checked here: some configs carry -1 for "no pad token"."""

POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
"""Finite reals > 0 when present."""


def model_config_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Every problem of `cfg`'s numbers, each ``"{key} {why}, got {value}"``."""
    problems: list[str] = []
    for key in POSITIVE_INTS:
        if cfg.get(key) is not None:
            numparse.collect(cfg[key], key, None, problems, integer=True, lo=1)
    for key in OPTIONAL_INTS:
        if cfg.get(key) is not None:
            numparse.collect(cfg[key], key, None, problems, integer=True, lo=0)
    for key in POSITIVE_FLOATS:
        if cfg.get(key) is not None:
            numparse.collect(cfg[key], key, None, problems, lo=0, lo_open=True)
    if problems:
        return problems
    heads, kv, hidden = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads"), cfg.get("hidden_size")
    if heads and hidden and cfg.get("head_dim") is None and hidden % heads:
        problems.append(f"num_attention_heads {heads} does not divide hidden_size {hidden} (and no head_dim is given)")
    if heads and kv and heads % kv:
        problems.append(f"num_key_value_heads {kv} does not divide num_attention_heads {heads}")
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    used = cfg.get("num_experts_per_tok")
    if experts and used and used > experts:
        problems.append(f"num_experts_per_tok {used} exceeds the expert count {experts}")
    return problems


def check_model_config(cfg: Mapping[str, Any], where: str) -> None:
    """ConvertError ``"{where}: bad model config: ..."`` listing `model_config_problems`, if any."""
    problems = model_config_problems(cfg)
    if problems:
        raise ConvertError(f"{where}: bad model config: " + "; ".join(problems))
