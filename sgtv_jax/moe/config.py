"""The `sgtv moe` YAML: mergekit-moe's keys, plus `calibrated` gates (docs/moe.md).

Every problem is collected and reported at once as a `ConfigError` that names
the file and the key (``experts[1].positive_prompts``); nothing is read from
the models here except their config.json (`resolve_architecture`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.containment import read_contained_json
from sgtv_jax.pipeline.config import ConfigError, read_yaml

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random", "calibrated")
ARCHITECTURES = ("mixtral", "qwen", "qwen3")  # mergekit-moe's "Mixtral", "Qwen MoE", "Qwen3 MoE"
CALIBRATION_FITS = ("mean", "lstsq")
TOP_KEYS = {
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "shared_experts",
    "architecture",
    "tokenizer_source",
    "seed",
    "calibration_fit",
    "calibration_seqlen",
}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale", "calibration"}
DTYPES = ("bfloat16", "float16", "float32")
# input model types each output architecture accepts (mergekit-moe's `supports_config`)
ARCH_INPUTS = {"mixtral": ("llama", "mistral"), "qwen": ("llama", "mistral", "qwen2"), "qwen3": ("qwen3",)}


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: the model whose MLP it is, and the texts that shape its router row."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None
    calibration: str | None = None  # a text / .jsonl file (calibrated gates)


@dataclass(frozen=True)
class MoeConfig:
    base_model: str
    experts: tuple[ExpertSpec, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[ExpertSpec, ...] = ()
    architecture: str | None = None
    seed: int = 0
    calibration_fit: str = "mean"
    calibration_seqlen: int = 256
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def models(self) -> dict[str, str]:
        """Every input model path, labelled (for the output-overlap check)."""
        out = {"base_model": self.base_model}
        for k, e in enumerate(self.experts):
            out[f"experts[{k}].source_model"] = e.source_model
        for k, e in enumerate(self.shared_experts):
            out[f"shared_experts[{k}].source_model"] = e.source_model
        return out


def _strings(v: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        problems.append(f"{where}: a list of strings expected, got {type(v).__name__}")
        return ()
    return tuple(v)


def _number(v: Any, where: str, problems: list[str], *, integer: bool = False, lo: float = 0.0) -> Any:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (v >= lo) or v != v or v in (float("inf"),):
        kind = "an integer" if integer else "a finite number"
        problems.append(f"{where}: {kind} >= {lo:g} expected, got {v!r}")
        return None
    return v


def _path(v: Any, root: Path, where: str, problems: list[str]) -> str:
    if not isinstance(v, str) or not v:
        problems.append(f"{where}: a path expected, got {v!r}")
        return ""
    p = Path(v).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.exists():
        problems.append(f"{where}: {v!r} does not exist (only local paths; nothing is downloaded)")
    return str(p)


def _expert(raw: Any, root: Path, where: str, problems: list[str]) -> ExpertSpec | None:
    if isinstance(raw, str):  # mergekit accepts a bare model reference in lists of models
        raw = {"source_model": raw}
    if not isinstance(raw, dict):
        problems.append(f"{where}: a mapping with source_model expected")
        return None
    for k in sorted(set(raw) - EXPERT_KEYS):
        problems.append(f"{where}.{k}: unsupported key (supported: {', '.join(sorted(EXPERT_KEYS))})")
    if "source_model" not in raw:
        problems.append(f"{where}.source_model: required")
        return None
    calib = raw.get("calibration")
    return ExpertSpec(
        source_model=_path(raw["source_model"], root, f"{where}.source_model", problems),
        positive_prompts=_strings(raw.get("positive_prompts"), f"{where}.positive_prompts", problems),
        negative_prompts=_strings(raw.get("negative_prompts"), f"{where}.negative_prompts", problems),
        noise_scale=None
        if raw.get("noise_scale") is None
        else _number(raw["noise_scale"], f"{where}.noise_scale", problems),
        residual_scale=None
        if raw.get("residual_scale") is None
        else _number(raw["residual_scale"], f"{where}.residual_scale", problems),
        calibration=None if calib is None else _path(calib, root, f"{where}.calibration", problems),
    )


def _experts(raw: Any, root: Path, key: str, problems: list[str]) -> tuple[ExpertSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        problems.append(f"{key}: a non-empty list expected")
        return ()
    out = [_expert(r, root, f"{key}[{k}]", problems) for k, r in enumerate(raw)]
    return tuple(e for e in out if e is not None)


def _choice(raw: dict[str, Any], key: str, choices: tuple[str, ...], default: Any, problems: list[str]) -> Any:
    v = raw.get(key, default)
    if v is not default and v not in choices:
        problems.append(f"{key}: {v!r} is not one of {', '.join(choices)}")
        return default
    return v


def _prompt_checks(cfg: MoeConfig, problems: list[str]) -> None:
    """mergekit-moe's `is_bad_config` rules, plus the texts `calibrated` needs."""
    if cfg.gate_mode in ("random", "uniform_random"):
        return
    for k, e in enumerate(cfg.experts):
        if cfg.gate_mode == "calibrated":
            if not e.positive_prompts and e.calibration is None:
                problems.append(
                    f"experts[{k}]: gate_mode calibrated needs calibration (a text file) or positive_prompts"
                )
        elif not e.positive_prompts:
            problems.append(f"experts[{k}].positive_prompts: required by gate_mode {cfg.gate_mode}")
    if cfg.gate_mode != "calibrated" and len(cfg.experts) > 1:
        tups = {(e.positive_prompts, e.negative_prompts) for e in cfg.experts}
        if len(tups) == 1:
            problems.append(
                "experts[*].positive_prompts: identical for every expert; the router could not tell them apart"
            )


def parse_moe_config(raw: Any, root: Path) -> MoeConfig:
    """Validate a loaded YAML mapping; `ConfigError` listing every problem (keys named)."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping")
    problems: list[str] = []
    for k in sorted(set(raw) - TOP_KEYS):
        problems.append(f"{k}: unsupported key (supported: {', '.join(sorted(TOP_KEYS))})")
    if "base_model" not in raw:
        problems.append("base_model: required")
    if "experts" not in raw:
        problems.append("experts: required")
    base = _path(raw.get("base_model"), root, "base_model", problems) if "base_model" in raw else ""
    experts = _experts(raw.get("experts"), root, "experts", problems)
    shared = _experts(raw.get("shared_experts"), root, "shared_experts", problems)
    if len(shared) > 1:
        problems.append("shared_experts: at most one shared expert is supported (as mergekit-moe)")
    tok = raw.get("tokenizer_source", "base")
    if tok != "base":
        problems.append(
            f"tokenizer_source: only 'base' is supported (the output takes the base's tokenizer), got {tok!r}"
        )
    k = _number(raw.get("experts_per_token", 2), "experts_per_token", problems, integer=True, lo=1)
    arch = raw.get("architecture")
    if arch is not None and (not isinstance(arch, str) or _arch_name(arch) is None):
        problems.append(f"architecture: {arch!r} is not one of mixtral, qwen (qwen2_moe), qwen3 (qwen3_moe)")
        arch = None
    cfg = MoeConfig(
        base_model=base,
        experts=experts,
        gate_mode=_choice(raw, "gate_mode", GATE_MODES, "hidden", problems),
        dtype=_choice(raw, "dtype", DTYPES, None, problems),
        experts_per_token=k if k is not None else 2,
        shared_experts=shared,
        architecture=None if arch is None else _arch_name(arch),
        seed=_number(raw.get("seed", 0), "seed", problems, integer=True) or 0,
        calibration_fit=_choice(raw, "calibration_fit", CALIBRATION_FITS, "mean", problems),
        calibration_seqlen=_number(
            raw.get("calibration_seqlen", 256), "calibration_seqlen", problems, integer=True, lo=2
        )
        or 256,
        raw=raw,
    )
    if experts and k is not None and len(experts) < k:
        problems.append(f"experts_per_token: {k} is more than the {len(experts)} experts")
    _prompt_checks(cfg, problems)
    if problems:
        raise ConfigError("\n".join(["invalid MoE config:"] + [f"  - {p}" for p in problems]))
    return cfg


def _arch_name(name: str) -> str | None:
    """mergekit-moe's spellings (`Mixtral`, `qwen`, `Qwen3 MoE`, `qwen2_moe`, ...) -> ours."""
    n = name.lower().replace("-", "_").replace(" ", "_")
    table = {"mixtral": "mixtral", "qwen": "qwen", "qwen_moe": "qwen", "qwen2_moe": "qwen", "qwen2": "qwen"}
    table.update({"qwen3": "qwen3", "qwen3_moe": "qwen3"})
    return table.get(n)


def load_moe_config(path: str | Path) -> MoeConfig:
    """Read and validate a `sgtv moe` YAML (paths relative to its folder); errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    raw = read_yaml(p)
    try:
        return parse_moe_config(raw, p.parent)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _model_type(path: str, where: str) -> str:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{where}: {path} has no config.json (a Hugging Face model folder is needed)")
    cfg = read_contained_json(path, "config.json", what=f"{where}'s config")
    return str(cfg.get("model_type")) if isinstance(cfg, dict) else "?"


def resolve_architecture(cfg: MoeConfig) -> str:
    """The output architecture: as configured, else mergekit-moe's choice (Mixtral first)."""
    types = {where: _model_type(p, where) for where, p in cfg.models().items()}
    if len(set(types.values())) != 1:
        listed = ", ".join(f"{w}={t}" for w, t in types.items())
        raise ConfigError(f"every model must have one architecture (as mergekit-moe requires): {listed}")
    mt = next(iter(types.values()))
    candidates = [cfg.architecture] if cfg.architecture else list(ARCHITECTURES)
    for arch in candidates:
        shared_ok = len(cfg.shared_experts) == 1 if arch == "qwen" else not cfg.shared_experts
        if mt in ARCH_INPUTS[arch] and shared_ok:
            return arch
    why = ", ".join(f"{a} takes {'/'.join(ARCH_INPUTS[a])}" for a in candidates)
    shared = "one shared expert (qwen only)" if cfg.shared_experts else "no shared expert (qwen needs exactly one)"
    key = "architecture" if cfg.architecture else "base_model"
    raise ConfigError(f"{key}: no output architecture fits models of type {mt!r} with {shared} ({why})")
