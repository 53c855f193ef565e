"""PEFT LoRA adapters read as checkpoints: a fine-tune given as ``base + adapter``.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors``. For every adapted module M (keys
``base_model.model.M.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
``[out, r]``, optionally with an adapter name before ``.weight``) the fine-tuned
weight is::

    W' = W + s * B @ A          nn.Linear, W [out, in]
    W' = W + s * (B @ A).T      GPT-2 Conv1D, W [in, out] (PEFT's fan_in_fan_out)
    E' = E + s * (B @ A).T      embedding: lora_embedding_A [r, vocab], lora_embedding_B [dim, r]

with ``s = alpha / r`` (``use_rslora``: ``alpha / sqrt(r)``), ``r`` and
``alpha`` per module from ``rank_pattern`` / ``alpha_pattern``. Like PEFT, the
layer decides the layout (a Conv1D is transposed whatever ``fan_in_fan_out``
says). Tensors stored in full (``modules_to_save``; an embedding's
``base_layer`` saved beside its factors) replace the base's.

`LoraCheckpoint` presents the result as a normal `Checkpoint` with the base's
names and shapes, so every reader of a fine-tune (merge, calibration, checks)
sees a dense model; a tensor a LoRA changes is computed in float32 on read.

The adapted modules are those with factors in the file; each must be one that
``target_modules`` selects by PEFT's rules (a string is a regex that must match
the whole module name, a list matches a name equal to or ending in
``.<entry>``, ``exclude_modules`` / ``modules_to_save`` / ``layers_to_transform``
narrow it). A selected module without factors is unchanged, as with PEFT's
zero-initialised ``lora_B``. Refused by name: ``bias`` other than ``none``,
DoRA, LoRA biases, and the options that are not a plain low-rank update.
Adapter weights are read only from safetensors (a pickled
``adapter_model.bin`` is never unpickled), and both files must resolve inside
the adapter directory (`convert.lora_config` reads and checks the config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from convert.architectures import ARCHITECTURES
from convert.checkpoint import Checkpoint
from convert.errors import ConvertError
from convert.lora_config import (  # noqa: F401  (re-exported: the adapter's names stay importable from here)
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ALL_LINEAR,
    PICKLED_WEIGHTS,
    AdapterConfig,
    read_adapter_config,
)
from convert.readers import hf_config_object, open_checkpoint
from convert.safetensors_reader import SafetensorsCheckpoint

PEFT_PREFIX = "base_model.model."
_FACTORS = {
    "lora_A": ("linear", "A"),
    "lora_B": ("linear", "B"),
    "lora_embedding_A": ("embedding", "A"),
    "lora_embedding_B": ("embedding", "B"),
}

# --------------------------------------------------------------------------- layers


def tensor_kinds(config: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """(canonicalise, {canonical HF tensor name: kind}) of an architecture.

    kind: ``linear`` (nn.Linear weight ``[out, in]``), ``conv1d`` (GPT-2's
    ``[in, out]``), ``embedding`` or ``other``. Without a name map for the
    model type: identity and an empty table (then ``fan_in_fan_out`` decides).
    """

    arch = ARCHITECTURES.get(str(config.get("model_type")))
    if arch is None:
        return (lambda n: n), {}
    nm = arch.name_map
    kinds = {}
    for rule in nm.rules(hf_config_object(config)):
        leaf = rule.flax_path[-1]
        if leaf == "kernel" and len(rule.hf_shape) == 2:
            kinds[rule.hf_name] = "linear" if rule.transpose else "conv1d"
        elif leaf == "embedding":
            kinds[rule.hf_name] = "embedding"
        else:
            kinds[rule.hf_name] = "other"
    return nm.canonical_name, kinds


@dataclasses.dataclass(frozen=True)
class _Update:
    """The low-rank update of one base tensor."""

    module: str  # as named in the adapter
    a_key: str
    b_key: str
    scale: float
    transpose: bool  # (B @ A).T is added: Conv1D and embeddings


class LoraCheckpoint:
    """A base `Checkpoint` with a PEFT LoRA adapter applied, read lazily (module doc).

    Opening validates everything from headers, reading no weights: the
    config, every adapter key (naming it), that its module exists in the base
    and is one ``target_modules`` selects, and every factor's shape against the
    base tensor. ``path`` is the adapter directory; ``base`` the base checkpoint.
    """

    def __init__(self, base: Checkpoint, adapter_dir: str | Path) -> None:
        self.base = base
        self.path = Path(adapter_dir)
        self.adapter = read_adapter_config(self.path)
        self._weights = SafetensorsCheckpoint(self.path, single_file=ADAPTER_WEIGHTS)
        try:
            self._updates, self._replaced = self._plan()
        except BaseException:
            self._weights.close()
            raise

    @property
    def _file(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    def _plan(self) -> tuple[dict[str, _Update], dict[str, str]]:
        canon, kinds = tensor_kinds(self.base.config)
        by_canon = {canon(n): n for n in self.base.names()}
        factors: dict[tuple[str, str], dict[str, str]] = {}  # (module, linear|embedding) -> {A: key, B: key}
        replaced: dict[str, str] = {}
        adapter_names: set[str] = set()
        for key in self._weights.names():
            if not key.startswith(PEFT_PREFIX):
                raise ConvertError(
                    f"{self._file}: tensor {key!r} is not a PEFT key (expected "
                    f"{PEFT_PREFIX}<module>.lora_A.weight and the like)"
                )
            comps = key[len(PEFT_PREFIX) :].split(".")
            if "lora_magnitude_vector" in comps:
                raise ConvertError(f"{self._file}: tensor {key!r} is a DoRA magnitude; DoRA is not supported")
            at = max((i for i, c in enumerate(comps) if c in _FACTORS), default=None)
            if at is not None:
                module, (layer, which), tail = ".".join(comps[:at]), _FACTORS[comps[at]], comps[at + 1 :]
                if layer == "linear" and tail and tail[-1] == "bias":
                    raise ConvertError(f"{self._file}: tensor {key!r} is a LoRA bias; lora_bias is not supported")
                name_tail = tail[:-1] if layer == "linear" else tail
                if (layer == "linear" and (not tail or tail[-1] != "weight")) or len(name_tail) > 1:
                    raise ConvertError(
                        f"{self._file}: tensor {key!r} is not a LoRA factor PEFT writes "
                        f"(expected <module>.{comps[at]}{'.weight' if layer == 'linear' else ''})"
                    )
                adapter_names.update(name_tail)
                slot = factors.setdefault((module, layer), {})
                slot[which] = key
                continue
            if "base_layer" in comps:  # an embedding saved in full beside its factors
                j = comps.index("base_layer")
                target = ".".join(comps[:j] + comps[j + 1 :])
            else:
                module = ".".join(comps[:-1])
                if not any(module.endswith(m) for m in self.adapter.modules_to_save):
                    raise ConvertError(
                        f"{self._file}: tensor {key!r} is neither a LoRA factor nor part of modules_to_save "
                        f"{list(self.adapter.modules_to_save)} (bias 'none' adapters carry no other tensors)"
                    )
                target = ".".join(comps)
            base_name = by_canon.get(canon(target))
            if base_name is None:
                raise ConvertError(
                    f"{self._file}: tensor {key!r} replaces {target!r}, which base model {self.base.path} does not have"
                )
            got, want = tuple(self._weights.shape(key)), tuple(self.base.shape(base_name))
            if got != want:
                raise ConvertError(
                    f"{self._file}: tensor {key!r} has shape {got} but {base_name!r} of base model "
                    f"{self.base.path} has {want}: the adapter was made for another base"
                )
            replaced[base_name] = key
        if len(adapter_names) > 1:
            raise ConvertError(
                f"{self._file}: holds several adapters ({', '.join(sorted(adapter_names))}); "
                "save each in its own directory"
            )
        updates = {}
        for (module, layer), slot in factors.items():
            upd, base_name = self._update(module, layer, slot, canon, kinds, by_canon)
            if base_name in updates:
                raise ConvertError(f"{self._file}: two LoRA updates for {base_name!r}")
            updates[base_name] = upd
        if not updates and not replaced:
            raise ConvertError(f"{self._file}: holds no LoRA factors")
        return updates, replaced

    def _update(
        self, module: str, layer: str, slot: dict[str, str], canon: Any, kinds: dict[str, str], by_canon: dict[str, str]
    ) -> tuple[_Update, str]:
        for which in ("A", "B"):
            if which not in slot:
                other = slot["B" if which == "A" else "A"]
                raise ConvertError(f"{self._file}: tensor {other!r} has no lora_{which} partner")
        a_key, b_key = slot["A"], slot["B"]
        weight = canon(f"{module}.weight")
        base_name = by_canon.get(weight)
        if base_name is None:
            tied = " (the base ties it to the input embedding)" if module.endswith("lm_head") else ""
            raise ConvertError(
                f"{self._file}: tensor {a_key!r} adapts module {module!r}, which base model "
                f"{self.base.path} does not have{tied}"
            )
        kind = kinds.get(weight)
        is_linear = kind in ("linear", "conv1d") or (kind is None and len(self.base.shape(base_name)) == 2)
        if not self.adapter.targets(module, is_linear):
            raise ConvertError(
                f"{self._file}: tensor {a_key!r} adapts module {module!r}, which target_modules "
                f"{self.adapter.target_modules!r} of {self.adapter.path.name} does not select "
                "(PEFT would ignore these factors)"
            )
        a_shape, b_shape = tuple(self._weights.shape(a_key)), tuple(self._weights.shape(b_key))
        w_shape = tuple(self.base.shape(base_name))
        if len(a_shape) != 2 or len(b_shape) != 2 or len(w_shape) != 2:
            raise ConvertError(
                f"{self._file}: tensor {a_key!r} {a_shape} / {b_key!r} {b_shape} adapt "
                f"{base_name!r} {w_shape}: LoRA factors and their weight must be 2-D"
            )
        rank = self.adapter.rank(module)
        if a_shape[0] != rank or b_shape[1] != rank:
            raise ConvertError(
                f"{self._file}: tensor {a_key!r} {a_shape} / {b_key!r} {b_shape} have rank "
                f"{a_shape[0]}/{b_shape[1]} but {self.adapter.path.name} says r = {rank} for {module!r}"
            )
        if layer == "embedding":
            transpose = True
        elif kind in ("linear", "conv1d"):
            transpose = kind == "conv1d"  # PEFT follows the layer, whatever fan_in_fan_out says
        else:
            transpose = self.adapter.fan_in_fan_out
        product = (b_shape[0], a_shape[1])
        if (product[::-1] if transpose else product) != w_shape:
            raise ConvertError(
                f"{self._file}: tensor {b_key!r} {b_shape} @ {a_key!r} {a_shape} gives {product}"
                f"{' transposed' if transpose else ''}, but {base_name!r} of base model {self.base.path} is "
                f"{w_shape}: the adapter was made for another base"
            )
        return _Update(module, a_key, b_key, self.adapter.scale(module), transpose), base_name

    # -- Checkpoint interface -------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return self.base.config

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.shape(name))

    def dtype(self, name: str) -> np.dtype:
        dt = self._weights.dtype(self._replaced[name]) if name in self._replaced else self.base.dtype(name)
        if name in self._updates:  # W + s*B@A in float32 (float64 kept): a bf16 W would swallow the update
            return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)
        return dt

    def updated(self) -> dict[str, float]:
        """Base tensor name -> scale of its LoRA update (the tensors the adapter changes by low rank)."""
        return {n: u.scale for n, u in self._updates.items()}

    def replaced(self) -> list[str]:
        """Base tensors the adapter replaces in full."""
        return list(self._replaced)

    def delta(self, name: str) -> np.ndarray:
        """``s * B @ A`` of tensor `name` in its HF layout (float32; zeros for a tensor no LoRA adapts)."""
        upd = self._updates.get(name)
        if upd is None:
            return np.zeros(self.shape(name), np.float32)
        a = np.asarray(self._weights.get(upd.a_key), np.float32)
        b = np.asarray(self._weights.get(upd.b_key), np.float32)
        d = (b @ a) * np.float32(upd.scale)
        return np.ascontiguousarray(d.T) if upd.transpose else d

    def get(self, name: str) -> np.ndarray:
        if name in self._replaced:
            base = self._weights.get(self._replaced[name])
        else:
            base = self.base.get(name)
        if name not in self._updates:
            return base
        out = np.asarray(base, self.dtype(name))
        out += self.delta(name)
        return out

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names():
            yield name, self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def close(self) -> None:
        self._weights.close()
        self.base.close()

    def __enter__(self) -> LoraCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LoraCheckpoint({str(self.base.path)!r} + {str(self.path)!r}, {len(self._updates)} LoRA update(s), "
            f"{len(self._replaced)} replaced)"
        )


def open_model(path: str | Path, adapter: str | Path | None = None) -> Checkpoint:
    """`open_checkpoint(path)`, with the LoRA adapter directory `adapter` applied when given."""

    base = open_checkpoint(path)
    if not adapter:
        return base
    try:
        return LoraCheckpoint(base, adapter)
    except BaseException:
        base.close()
        raise
