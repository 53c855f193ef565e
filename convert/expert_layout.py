"""MoE expert tensors, per expert or fused (transformers 5's layout), for Mixtral / Qwen2-MoE / Qwen3-MoE.

Per expert (what transformers 5's ``save_pretrained`` writes, and older
versions' module names)::

    model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight   (Mixtral: gate, up, down)
    model.layers.L.block_sparse_moe.gate.weight                   (Mixtral router)
    model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight   (Qwen)

Fused (transformers 5's in-memory names, mergekit 0.1.5's output)::

    model.layers.L.mlp.experts.gate_up_proj   [E, 2F, D]   expert e: its gate rows, then its up rows
    model.layers.L.mlp.experts.down_proj      [E, D, F]
    model.layers.L.mlp.gate.weight            [E, D]       (Mixtral's router renamed; Qwen's unchanged)

The installed transformers loads both (tests/pipeline/test_moe_build.py compares logits).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from convert.errors import ConvertError
from convert.export import INDEX_FILE, SINGLE_FILE, _ShardWriter, parse_size
from convert.readers import open_checkpoint

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
_ROLE = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": 2, "down_proj": 2}  # gate, up, down
Lazy = Mapping[str, Callable[[], np.ndarray]]


def _stacked(parts: list[list[Callable[[], np.ndarray]]]) -> np.ndarray:
    """``[E, rows, cols]``: per expert, its readers' weights concatenated by rows."""
    return np.stack([np.concatenate([read() for read in expert]) for expert in parts])


def fuse_lazy(tensors: Lazy) -> dict[str, Callable[[], np.ndarray]]:
    """Per-expert tensors (lazy readers, HF names) -> the fused layout, other tensors as they are.

    A layer's fused pair takes the place of its first expert tensor (order kept
    otherwise). ConvertError if a layer's experts are not all complete.
    """
    layers: dict[int, dict[int, dict[int, Callable[[], np.ndarray]]]] = {}
    out: dict[str, Callable[[], np.ndarray]] = {}
    for name, read in tensors.items():
        m = _EXPERT.match(name)
        if m is None or m[4] not in _ROLE:
            if re.fullmatch(r"model\.layers\.\d+\.block_sparse_moe\.gate\.weight", name):
                name = name.replace("block_sparse_moe.gate", "mlp.gate")
            out[name] = read
            continue
        layer = int(m[1])
        if layer not in layers:
            layers[layer] = {}
            out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = read  # placeholders keep the position
            out[f"model.layers.{layer}.mlp.experts.down_proj"] = read
        layers[layer].setdefault(int(m[3]), {})[_ROLE[m[4]]] = read
    for layer, experts in layers.items():
        idx = sorted(experts)
        if idx != list(range(len(idx))) or any(len(experts[e]) != 3 for e in idx):
            raise ConvertError(f"model.layers.{layer}: experts {idx} are not all complete (gate, up, down)")
        gate_up = [[experts[e][0], experts[e][1]] for e in idx]
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = functools.partial(_stacked, gate_up)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = functools.partial(_stacked, [[experts[e][2]] for e in idx])
    return out


EXPERT_LAYOUTS = ("per_expert", "fused")


def check_expert_layout(layout: str, fmt: str, model_type: str | None) -> None:
    """``--expert-layout``: fused needs a Hugging Face output of a MoE model type (ConvertError otherwise)."""
    if layout not in EXPERT_LAYOUTS:
        raise ConvertError(f"--expert-layout {layout!r}: one of per-expert, fused")
    if layout == "fused" and (fmt != "hf" or model_type not in MOE_MODEL_TYPES):
        raise ConvertError(
            f"--expert-layout fused: needs --format hf and a {' / '.join(MOE_MODEL_TYPES)} model "
            f"(this merge: --format {fmt}, model_type {model_type})"
        )


def fuse_expert_files(directory: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Rewrite the safetensors of a per-expert MoE folder (our own output being written) in the fused layout.

    One layer's experts are in memory at a time. The new shards are written
    beside the old ones first, so a failure leaves the old set whole.
    """
    d = Path(directory)
    new = d / ".fused-shards"
    with open_checkpoint(d) as ck:
        if not any(_EXPERT.match(n) for n in ck.names()):
            raise ConvertError(f"{d}: no per-expert MoE tensors to fuse")
        fused = fuse_lazy({n: functools.partial(ck.get, n) for n in ck.names()})
        new.mkdir()
        writer = _ShardWriter(new, parse_size(max_shard_size))
        for name, read in fused.items():
            writer.add(name, read())
        files = writer.finish()
    for old in [*d.glob("model-*-of-*.safetensors"), d / SINGLE_FILE, d / INDEX_FILE]:
        old.unlink(missing_ok=True)
    for f in [*files, *([INDEX_FILE] if (new / INDEX_FILE).exists() else [])]:
        (new / f).rename(d / f)
    new.rmdir()
