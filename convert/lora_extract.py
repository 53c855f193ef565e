"""A task vector written as a PEFT LoRA adapter: truncated SVD per linear layer.

For every linear layer (nn.Linear ``[out, in]``; GPT-2 Conv1D ``[in, out]``,
taken as its transpose) whose weight differs between MODEL and BASE, the
difference ``D = W_model - W_base`` (``[out, in]``, float32) is factored by its
SVD ``D = U S V^T`` and cut to rank ``k = min(r, out, in)``::

    lora_B = U_k sqrt(S_k)   [out, k]        lora_A = sqrt(S_k) V_k^T   [k, in]

so ``B @ A`` is the best rank-k approximation (Eckart-Young) and the adapter's
scale is 1 (``lora_alpha = r``; a layer cut to ``k < r`` gets ``rank_pattern``
and ``alpha_pattern`` entries ``k``). Each layer's retained energy is
``sum(S_k^2) / sum(S^2)``: the relative squared Frobenius error of the layer's
update is one minus it.

Tensors that are not linear weights (embeddings, norms) and changed are saved
in full through ``modules_to_save`` (PEFT saves whole modules, so every tensor
of such a module is written), unless the module is also a LoRA target (a
linear layer's bias) or the embedding is tied to the output head; those
changes cannot be expressed with ``bias: none`` and are listed as dropped,
with their relative size. Unchanged layers are left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convert.atomic import atomic_output
from convert.checkpoint import Checkpoint
from convert.errors import ConvertError
from convert.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, tensor_kinds
from convert.readers import open_checkpoint
from convert.safetensors_writer import StreamingSafetensorsWriter
from sgtv_jax import numparse

REPORT = "lora_report.json"


def low_rank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(A [k, in], B [out, k], retained energy)`` of the best rank-k approximation of `delta` ``[out, in]``.

    ``k = min(rank, out, in)``; float32 factors with ``B @ A ~ delta``; energy
    in [0, 1] (1 for a zero `delta`).
    """
    d = np.asarray(delta, np.float32)
    k = min(rank, *d.shape)
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    s64 = s.astype(np.float64)
    total = float(np.sum(s64**2))
    energy = float(np.sum(s64[:k] ** 2) / total) if total > 0 else 1.0
    root = np.sqrt(s[:k])
    b = np.ascontiguousarray(u[:, :k] * root[None, :], np.float32)
    a = np.ascontiguousarray(root[:, None] * vt[:k], np.float32)
    return a, b, energy


def _module(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _check_pair(model: Checkpoint, base: Checkpoint) -> None:
    mt, bt = model.config.get("model_type"), base.config.get("model_type")
    if mt != bt:
        raise ConvertError(f"{model.path}: architecture {mt!r} differs from base {base.path}'s {bt!r}")
    missing = [n for n in base.names() if n not in model]
    extra = [n for n in model.names() if n not in base]
    if missing or extra:
        which, names, other = ("lacks", missing, "") if missing else ("has", extra, " the base lacks")
        raise ConvertError(
            f"{model.path}: {which} tensor {names[0]!r}{other} ({len(names)} in all); "
            f"a LoRA adapter needs the same tensors as base {base.path}"
        )
    for n in base.names():
        if tuple(model.shape(n)) != tuple(base.shape(n)):
            raise ConvertError(
                f"{model.path}: tensor {n!r} has shape {tuple(model.shape(n))} but base "
                f"{base.path} has {tuple(base.shape(n))}"
            )


def _check_rank(rank: Any, what: str) -> None:
    """A LoRA rank: a positive integer within int64 (`sgtv_jax.numparse`); ConvertError naming `what`."""
    why = numparse.problem(rank, integer=True, lo=1)
    if why is not None:
        why = "must be a positive integer" if why.startswith("must") else why
        raise ConvertError(f"{what} {why}, got {numparse.show(rank)}")


def write_adapter(
    dst: str | Path,
    model: Checkpoint,
    base: Checkpoint,
    rank: int,
    *,
    base_name: str,
    modules_to_save: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``MODEL - BASE`` as a PEFT LoRA adapter into the existing directory `dst`; returns the report.

    Writes ``adapter_config.json``, ``adapter_model.safetensors`` and the
    report ``lora_report.json`` (per layer: module, shape ``[out, in]``, kept
    rank, retained energy; the tensors saved in full; the dropped ones with
    ``|D| / |W_base|``). `base_name`: ``base_model_name_or_path`` as the user
    wrote it. One tensor pair in memory at a time. ConvertError naming the
    tensor when the two checkpoints differ in architecture, names or shapes.
    """
    _check_rank(rank, "LoRA rank")
    _check_pair(model, base)
    dst = Path(dst)
    canon, kinds = tensor_kinds(base.config)
    tied = bool(base.config.get("tie_word_embeddings", False))
    names = base.names()
    by_module: dict[str, list[str]] = {}
    for n in names:
        by_module.setdefault(canon(_module(n)[0]), []).append(n)

    writer = StreamingSafetensorsWriter(dst / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    try:
        layers, changed_other, unchanged = _write_factors(writer, model, base, names, rank, canon, kinds, progress)
        targets = {row["module"] for row in layers}
        saved, dropped = _saved_or_dropped(changed_other, targets, tied, modules_to_save)
        for module in saved:  # PEFT saves a modules_to_save module whole
            for n in by_module[module]:
                writer.add(f"{PEFT_PREFIX}{canon(n)}", np.asarray(model.get(n)))
        if not layers and not saved:
            raise ConvertError(
                f"{model.path}: no tensor differs from base {base.path} in a way a LoRA adapter "
                "can carry (nothing to extract)"
            )
        writer.close()
    except BaseException:
        writer.abort()
        raise

    config = adapter_config(base.config, rank, layers, saved, base_name)
    (dst / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    report = _report(rank, base_name, layers, saved, dropped, unchanged)
    (dst / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


_Other = tuple[str, str, Any, float]  # (tensor, module, kind, |D| / |W_base|) of a changed non-LoRA tensor


def _write_factors(
    writer: StreamingSafetensorsWriter,
    model: Checkpoint,
    base: Checkpoint,
    names: list[str],
    rank: int,
    canon: Callable[[str], str],
    kinds: dict[str, str],
    progress: Callable[[str], None] | None,
) -> tuple[list[dict[str, Any]], list[_Other], int]:
    """Write ``lora_A`` / ``lora_B`` of every changed linear weight; returns (layer rows, other changed, unchanged count)."""
    layers: list[dict[str, Any]] = []
    changed_other: list[_Other] = []
    unchanged = 0
    for n in names:
        w_base = np.asarray(base.get(n), np.float32)
        delta = np.asarray(model.get(n), np.float32) - w_base
        if not np.any(delta):
            unchanged += 1
            continue
        kind = kinds.get(canon(n))
        module, param = _module(canon(n))
        if kind in ("linear", "conv1d") and param == "weight" and delta.ndim == 2:
            if progress is not None:
                progress(module)
            a, b, energy = low_rank(delta.T if kind == "conv1d" else delta, rank)
            writer.add(f"{PEFT_PREFIX}{module}.lora_A.weight", a)
            writer.add(f"{PEFT_PREFIX}{module}.lora_B.weight", b)
            layers.append(
                {
                    "module": module,
                    "tensor": n,
                    "kind": kind,
                    "shape": [b.shape[0], a.shape[1]],
                    "rank": a.shape[0],
                    "energy": energy,
                    "relative_error": float(np.sqrt(max(0.0, 1.0 - energy))),
                }
            )
        else:
            norm = float(np.linalg.norm(w_base))
            changed_other.append((n, module, kind, float(np.linalg.norm(delta)) / norm if norm else float("inf")))
        del delta, w_base
    return layers, changed_other, unchanged


def _saved_or_dropped(
    changed_other: list[_Other], targets: set[str], tied: bool, modules_to_save: bool
) -> tuple[list[str], list[dict[str, Any]]]:
    """(modules saved in full, dropped rows with their reason) of the changed tensors LoRA factors do not carry."""
    saved: list[str] = []
    dropped: list[dict[str, Any]] = []
    for n, module, kind, rel in changed_other:
        why = (
            "its module is a LoRA target (bias 'none' adapters cannot change its other tensors)"
            if module in targets
            else "a tied embedding (modules_to_save would untie it from the output head)"
            if kind == "embedding" and tied
            else "--no-modules-to-save"
            if not modules_to_save
            else None
        )
        if why is not None:
            dropped.append({"tensor": n, "relative_change": rel, "reason": why})
        elif module not in saved:
            saved.append(module)
    return saved, dropped


def _report(
    rank: int,
    base_name: str,
    layers: list[dict[str, Any]],
    saved: list[str],
    dropped: list[dict[str, Any]],
    unchanged: int,
) -> dict[str, Any]:
    """The ``lora_report.json`` object: per-layer rows plus the summary over them."""
    energies = [row["energy"] for row in layers]
    worst = min(layers, key=lambda row: row["energy"]) if layers else None
    return {
        "rank": rank,
        "base_model": base_name,
        "layers": layers,
        "modules_to_save": saved,
        "dropped": dropped,
        "unchanged_tensors": unchanged,
        "summary": {
            "lora_layers": len(layers),
            "min_energy": min(energies) if energies else None,
            "mean_energy": float(np.mean(energies)) if energies else None,
            "worst_layer": worst["module"] if worst else None,
        },
    }


def adapter_config(
    hf_config: dict[str, Any], rank: int, layers: list[dict[str, Any]], saved: list[str], base_name: str
) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it for these layers (scale 1: ``lora_alpha = r``)."""
    cut = {re.escape(row["module"]): row["rank"] for row in layers if row["rank"] != rank}
    return {
        "peft_type": "LORA",
        "task_type": None if hf_config.get("model_type") == "bert" else "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": None,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(row["module"] for row in layers),
        "fan_in_fan_out": any(row["kind"] == "conv1d" for row in layers),
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": saved or None,
        "rank_pattern": cut,
        "alpha_pattern": dict(cut),
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def summary(report: dict[str, Any], out: str | Path, worst: int = 5) -> str:
    """The printed summary of `write_adapter`'s report: totals and the least-retained layers."""
    s = report["summary"]
    lines = [
        f"wrote LoRA adapter {out}: {s['lora_layers']} layer(s) at rank {report['rank']}"
        + (
            f", retained energy min {s['min_energy']:.4f} ({s['worst_layer']}), mean {s['mean_energy']:.4f}"
            if s["lora_layers"]
            else ""
        )
        + f"; {len(report['modules_to_save'])} module(s) saved in full, {report['unchanged_tensors']} "
        "tensor(s) unchanged"
    ]
    for row in sorted(report["layers"], key=lambda r: r["energy"])[:worst]:
        lines.append(
            f"  {row['module']}: {row['shape'][0]}x{row['shape'][1]}, rank {row['rank']}, energy {row['energy']:.4f}"
        )
    for row in report["dropped"]:
        lines.append(f"  dropped {row['tensor']} (|delta|/|base| {row['relative_change']:.3g}): {row['reason']}")
    return "\n".join(lines)


def extract_lora(
    model: str | Path,
    base: str | Path,
    out: str | Path,
    rank: int,
    *,
    overwrite: bool = False,
    modules_to_save: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`write_adapter` of checkpoints `model` and `base` into a new directory `out`, atomically.

    `out` follows `convert.atomic.atomic_output` (never an input; replaced
    only with `overwrite` when it is an earlier sgtv output). Returns the report.
    """
    _check_rank(rank, "--rank")
    inputs = {"MODEL": str(model), "BASE": str(base)}
    with open_checkpoint(model) as m, open_checkpoint(base) as b:
        with atomic_output(out, kind="lora", overwrite=overwrite, inputs=inputs) as tmp:
            return write_adapter(
                tmp, m, b, rank, base_name=str(base), modules_to_save=modules_to_save, progress=progress
            )


ADAPTER_SUBDIR = "adapter"


def write_merged_adapter(model_dir: str | Path, base: Checkpoint, rank: int, base_name: str) -> dict[str, Any]:
    """`write_adapter` of the HF model just written in `model_dir` against `base`, into ``model_dir/adapter``.

    For ``sgtv merge --lora``: called on the output's partial directory, so the
    adapter is committed atomically with the merged model.
    """
    dst = Path(model_dir) / ADAPTER_SUBDIR
    dst.mkdir()
    with open_checkpoint(model_dir) as merged:
        return write_adapter(dst, merged, base, rank, base_name=base_name)
