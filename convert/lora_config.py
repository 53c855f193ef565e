"""A PEFT LoRA adapter's ``adapter_config.json``: validation and the per-module rules.

`read_adapter_config` checks the directory (config present, weights in
safetensors, both inside it) and every key that defines the update;
`AdapterConfig` answers PEFT's per-module questions (rank, scale, whether a
module is targeted). `convert.lora` applies the adapter; this module only reads
its config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from convert.containment import contained_file
from convert.errors import ConvertError
from sgtv_jax import numparse

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
ALL_LINEAR = "all-linear"
# adapter_config.json keys whose non-default value makes the update something other than W + s*B@A.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales each column by a learned magnitude",
    "lora_bias": "LoRA biases (lora_B.bias) add a bias term",
    "layer_replication": "layer replication changes the model's structure",
    "trainable_token_indices": "trainable tokens are stored as a sparse embedding update",
    "target_parameters": "LoRA on parameters (not modules) is stored differently",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA pools its inputs",
    "use_bdlora": "block-diagonal LoRA factors are stored differently",
}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``adapter_config.json`` that define the weight update."""

    path: Path  # the adapter_config.json file
    r: int
    lora_alpha: float
    target_modules: str | tuple[str, ...] | None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    exclude_modules: str | tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()

    def rank(self, module: str) -> int:
        """The rank PEFT gives `module` (``rank_pattern``, else ``r``)."""
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r))

    def scale(self, module: str) -> float:
        """``alpha / r`` of `module` (``alpha / sqrt(r)`` with rsLoRA)."""
        r = self.rank(module)
        alpha = float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str, is_linear: bool) -> bool:
        """Whether PEFT puts a LoRA layer on `module` (its name in the CausalLM model)."""
        if _listed_or_regex(self.exclude_modules, module):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False  # PEFT never adapts a module it saves in full
        tm = self.target_modules
        if tm is None:
            return True  # PEFT filled in its per-architecture default; the file's keys are the truth
        if tm == ALL_LINEAR:
            return is_linear
        if isinstance(tm, str):
            return re.fullmatch(tm, module) is not None
        if module in tm:
            return True
        if not any(module.endswith(f".{t}") for t in tm):
            return False
        return self._in_layers(module)

    def _in_layers(self, module: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or (isinstance(wanted, tuple) and not wanted):
            return True
        if not self.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            m = next(
                (x for p in self.layers_pattern if (x := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None
            )
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == wanted if isinstance(wanted, int) else idx in wanted


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    # PEFT's rule: the first pattern that matches the end of the module name (at a dot boundary).
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), module)


def _listed_or_regex(spec: str | tuple[str, ...] | None, module: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return module in spec or any(module.endswith(f".{s}") for s in spec)


# --------------------------------------------------------------------------- config


def _strings(v: Any, key: str, where: Path, *, regex_ok: bool) -> str | tuple[str, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        if regex_ok:
            _compile(v, key, where)
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise ConvertError(f"{where}: {key} must be a string (a regex) or a list of module names, got {v!r:.80}")


def _compile(pattern: str, key: str, where: Path) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConvertError(f"{where}: {key} {pattern!r:.80} is not a valid regular expression ({e})") from None


def _number(v: Any, key: str, where: Path, *, integer: bool = False, positive: bool = False) -> float:
    """A number of ``adapter_config.json`` by the one rule (`sgtv_jax.numparse`): finite, int64 ints."""
    why = numparse.problem(v, integer=integer, lo=0 if positive else None, lo_open=positive)
    if why is not None:
        what = "a positive integer" if integer and positive else "a positive number" if positive else "a number"
        why = f"must be {what}" if why.startswith("must") else why
        raise ConvertError(f"{where}: {key} {why}, got {numparse.show(v)}")
    return v


def _pattern(v: Any, key: str, where: Path, *, integer: bool) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConvertError(f"{where}: {key} must be a mapping of module patterns to values, got {v!r:.80}")
    for k, x in v.items():
        _compile(k, f"{key} key", where)
        _number(x, f"{key}[{k!r}]", where, integer=integer, positive=integer)
    return dict(v)


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    """Validate a PEFT LoRA adapter directory's config (and that its weights are safetensors).

    Raises ConvertError naming the file and key: a missing or pickled weights
    file, ``peft_type`` not LORA, ``r`` not a positive integer, ``bias`` other
    than ``none``, DoRA and the other non-plain options (`_UNSUPPORTED`), a
    malformed ``target_modules`` / pattern.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ConvertError(f"{d}: LoRA adapter directory not found")
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise ConvertError(
            f"{path}: missing (a PEFT LoRA adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    contained_file(d, ADAPTER_CONFIG, what=f"LoRA adapter {ADAPTER_CONFIG}")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [p for p in PICKLED_WEIGHTS if (d / p).is_file()]
        if pickled:
            raise ConvertError(
                f"{d / pickled[0]}: a pickled PyTorch file; adapter weights are read only from {ADAPTER_WEIGHTS} "
                "(unpickling can run code). Convert it where you trust it, e.g. PeftModel.from_pretrained(...)"
                ".save_pretrained(dir, safe_serialization=True)"
            )
        raise ConvertError(f"{weights}: missing (the adapter's weights)")
    contained_file(d, ADAPTER_WEIGHTS, what=f"LoRA adapter {ADAPTER_WEIGHTS}")

    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise ConvertError(f"{path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise ConvertError(
            f"{path}: bias {bias!r} is not supported (only 'none': the adapter would carry "
            "trained biases of the base model)"
        )
    for key, why in _UNSUPPORTED.items():
        if raw.get(key) not in (None, False, [], {}):
            raise ConvertError(f"{path}: {key} = {raw[key]!r:.60} is not supported ({why})")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(raw.get(key, False), bool):
            raise ConvertError(f"{path}: {key} must be true or false, got {raw[key]!r:.60}")
    ltt = raw.get("layers_to_transform")
    if ltt is not None:
        if isinstance(ltt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ltt):
            ltt = tuple(ltt)
        elif not (isinstance(ltt, int) and not isinstance(ltt, bool)):
            raise ConvertError(f"{path}: layers_to_transform must be an integer or a list of them, got {ltt!r:.60}")
    lp = _strings(raw.get("layers_pattern"), "layers_pattern", path, regex_ok=True)
    return AdapterConfig(
        path=path,
        r=int(_number(raw.get("r"), "r", path, integer=True, positive=True)),
        lora_alpha=float(_number(raw.get("lora_alpha", 8), "lora_alpha", path)),
        target_modules=_strings(raw.get("target_modules"), "target_modules", path, regex_ok=True),
        use_rslora=raw.get("use_rslora", False),
        fan_in_fan_out=raw.get("fan_in_fan_out", False),
        modules_to_save=tuple(_strings(raw.get("modules_to_save"), "modules_to_save", path, regex_ok=False) or ()),
        exclude_modules=_strings(raw.get("exclude_modules"), "exclude_modules", path, regex_ok=True),
        rank_pattern=_pattern(raw.get("rank_pattern"), "rank_pattern", path, integer=True),
        alpha_pattern=_pattern(raw.get("alpha_pattern"), "alpha_pattern", path, integer=False),
        layers_to_transform=ltt,
        layers_pattern=(lp,) if isinstance(lp, str) else tuple(lp or ()),
    )
