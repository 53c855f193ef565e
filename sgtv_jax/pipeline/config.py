"""Merge configuration: mergekit's YAML plus our calibration / OBS keys, validated up front.

The format users already write (mergekit)::

    models:
      - model: path/to/ft_a
        parameters: {density: 0.5, weight: 1.0}
      - model: path/to/ft_b
        parameters: {density: [1, 0.7, 0.1], weight: [{filter: mlp, value: 0.5}, {value: 0}]}
    merge_method: ties
    base_model: path/to/base
    parameters: {normalize: true}
    dtype: bfloat16
    tokenizer_source: base

Our keys (top level): ``trim`` (a trim name or filter rules, e.g. ``sparsegpt``),
``calibration`` (``data``: text / JSONL file(s), ``nsamples``, ``seqlen``,
``seed``, ``text_field``; also allowed per model, used by ``per_task``),
``hessian_source`` (``base`` | ``per_task`` | ``merged``), ``blocksize``,
``percdamp``, ``prunen`` / ``prunem``, ``refit`` (least-squares refit of the
entries OBS kept, see ``sgtv_jax.refit``), ``seed``, ``batch_size``,
``max_shard_size``.

Parameter values (per model ``density`` / ``weight`` / ``gamma`` / ``epsilon``,
and method parameters) are *specs*:

* a plain value;
* a list of numbers: a gradient over the decoder blocks, interpolated linearly
  (``np.interp`` of ``linspace(0, 1, len)`` at ``layer / (num_layers - 1)``);
  tensors outside the blocks use position 0 (embeddings) or 1 (final norm, head);
* a list of rules ``{filter: substring, value: spec}``; the first rule whose
  filter is a substring of the HF tensor name wins, a rule without filter
  matches everything; the value may itself be a gradient.

Relative paths are relative to the YAML file's directory. Every problem found
is reported at once (``ConfigError``), each naming its key and suggesting the
likely key for a typo (difflib).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import numbers
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

HESSIAN_SOURCES = ("base", "per_task", "merged")
TOP_KEYS = (
    "models", "merge_method", "base_model", "parameters", "dtype", "tokenizer_source", "trim",
    "calibration", "hessian_source", "blocksize", "percdamp", "prunen", "prunem", "refit", "seed",
    "batch_size", "max_shard_size",
)
MODEL_KEYS = ("model", "parameters", "calibration")
PER_MODEL_PARAMS = ("density", "weight", "gamma", "epsilon")
CALIBRATION_KEYS = ("data", "nsamples", "seqlen", "seed", "text_field")
DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
          "float32": "fp32", "fp32": "fp32"}
# Arguments of the tensor-level methods that the pipeline fills in itself.
_INTERNAL = {"deltas", "weights", "densities", "key", "calib", "grams", "base", "name", "gamma",
             "epsilon", "blocksize", "percdamp", "trim"}


class ConfigError(ValueError):
    """An invalid merge configuration; the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data: `data` files (.txt / .jsonl), `nsamples` windows of `seqlen` tokens."""

    data: tuple[str, ...]
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    text_field: str = "text"


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One fine-tuned model: its path, parameter specs, optional own calibration (per_task)."""

    model: str
    parameters: Mapping[str, Any]
    calibration: CalibrationConfig | None = None


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration (paths resolved to absolute strings)."""

    base_model: str
    models: tuple[ModelEntry, ...]
    merge_method: str
    parameters: Mapping[str, Any]
    trim: Any = None
    dtype: str | None = None
    tokenizer_source: str = "base"
    calibration: CalibrationConfig | None = None
    hessian_source: str = "merged"
    blocksize: int = 128
    percdamp: float = 0.01
    prunen: int = 0
    prunem: int = 0
    refit: bool = False
    seed: int = 0
    batch_size: int = 8
    max_shard_size: str = "5GB"

    def calibration_for(self, t: int) -> CalibrationConfig | None:
        """Calibration of fine-tuned model `t` (its own, else the shared one)."""
        return self.models[t].calibration or self.calibration

    def needs_calibration(self) -> bool:
        """Whether any tensor uses a data-aware trim (or the method needs Gram matrices)."""
        from sgtv_jax.merge.trim import DATA_TRIMS

        return self.merge_method == "regmean" or any(t in DATA_TRIMS for t in spec_values(self.trim))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for reports and model cards)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- specs


def _is_rules(spec: Any) -> bool:
    return isinstance(spec, (list, tuple)) and len(spec) > 0 and all(isinstance(r, Mapping) for r in spec)


def _is_gradient(spec: Any) -> bool:
    return (isinstance(spec, (list, tuple)) and len(spec) > 0
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in spec))


def spec_values(spec: Any) -> list[Any]:
    """Every leaf value a spec can take (for validation)."""
    if spec is None:
        return []
    if _is_rules(spec):
        return [v for r in spec for v in spec_values(r.get("value"))]
    if _is_gradient(spec):
        return list(spec)
    return [spec]


def layer_position(name: str, layer: int | None, num_layers: int) -> float:
    """Where tensor `name` sits on the gradient axis, in [0, 1]."""
    if layer is not None:
        return layer / max(num_layers - 1, 1)
    return 0.0 if any(k in name for k in ("embed", "wte", "wpe")) else 1.0


def resolve_spec(spec: Any, name: str, layer: int | None, num_layers: int) -> Any:
    """The value of a parameter spec for HF tensor `name` in decoder block `layer` (None: outside)."""
    if _is_rules(spec):
        for rule in spec:
            filt = rule.get("filter")
            if filt is None or str(filt) in name:
                return resolve_spec(rule.get("value"), name, layer, num_layers)
        raise ConfigError(f"no filter rule matches tensor {name!r} in {list(spec)!r} "
                          "(add a rule without 'filter' as the default)")
    if _is_gradient(spec):
        if len(spec) == 1:
            return float(spec[0])
        pos = layer_position(name, layer, num_layers)
        return float(np.interp(pos, np.linspace(0.0, 1.0, len(spec)), np.asarray(spec, float)))
    return spec


# --------------------------------------------------------------------------- validation


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"


def _unknown(d: Mapping[str, Any], known: Sequence[str], where: str, problems: list[str]) -> None:
    for k in d:
        if k not in known:
            problems.append(f"unknown key {k!r} in {where}{_suggest(k, known)}")


def method_parameters(method: str) -> tuple[str, ...]:
    """Parameters of merge method `method` a config may set in `parameters` (`lambda` for `lambda_`)."""
    from sgtv_jax.merge.registry import get_method

    params = inspect.signature(get_method(method)).parameters
    return tuple(("lambda" if p == "lambda_" else p) for p in params if p not in _INTERNAL)


def _path(value: Any, root: Path, where: str, problems: list[str]) -> str:
    if not isinstance(value, str) or not value:
        problems.append(f"{where} must be a path string, got {value!r}")
        return str(value)
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (root / p))


def _int(d: Mapping[str, Any], key: str, default: int, where: str, problems: list[str],
         minimum: int = 1) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < minimum:
        problems.append(f"{where}{key} must be an integer >= {minimum}, got {v!r}")
        return default
    return int(v)


def _calibration(raw: Any, root: Path, where: str, problems: list[str]) -> CalibrationConfig | None:
    if raw is None:
        return None
    if isinstance(raw, (str, list)):
        raw = {"data": raw}
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be a mapping with 'data' (file or list of files), got {raw!r}")
        return None
    _unknown(raw, CALIBRATION_KEYS, where, problems)
    data = raw.get("data")
    if data is None:
        problems.append(f"{where}.data is required (a .txt or .jsonl file, or a list of them)")
        data = []
    files = [data] if isinstance(data, str) else list(data) if isinstance(data, (list, tuple)) else [data]
    paths = tuple(_path(f, root, f"{where}.data", problems) for f in files)
    if not paths and data is not None:
        problems.append(f"{where}.data is an empty list")
    tf = raw.get("text_field", "text")
    if not isinstance(tf, str):
        problems.append(f"{where}.text_field must be a string, got {tf!r}")
    return CalibrationConfig(
        data=paths,
        nsamples=_int(raw, "nsamples", 128, f"{where}.", problems),
        seqlen=_int(raw, "seqlen", 512, f"{where}.", problems),
        seed=_int(raw, "seed", 0, f"{where}.", problems, minimum=0),
        text_field=str(tf),
    )


def _check_values(spec: Any, key: str, where: str, problems: list[str], lo: float | None = None,
                  hi: float | None = None) -> None:
    if _is_rules(spec):
        for r in spec:
            _unknown(r, ("filter", "value"), f"{where}.{key} rule", problems)
            if "value" not in r:
                problems.append(f"{where}.{key}: filter rule {dict(r)!r} has no 'value'")
    for v in spec_values(spec):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            problems.append(f"{where}.{key} must be a number (or a gradient / filter rules), got {v!r}")
        elif (lo is not None and v < lo) or (hi is not None and v > hi):
            problems.append(f"{where}.{key} must be in [{lo}, {hi}], got {v!r}")


def parse_config(raw: Mapping[str, Any], root: str | Path = ".") -> MergeConfig:
    """Validate a config mapping (as read from YAML) into a `MergeConfig`; raises `ConfigError`."""
    from sgtv_jax.merge.registry import available_methods, get_method
    from sgtv_jax.merge.trim import TRIMS

    root = Path(root)
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a YAML mapping, got {type(raw).__name__}")
    _unknown(raw, TOP_KEYS, "the config", problems)

    method = raw.get("merge_method")
    methods = available_methods()
    if method is None:
        problems.append(f"merge_method is required (one of {', '.join(methods)})")
    elif method not in methods:
        close = difflib.get_close_matches(str(method), methods, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"unknown merge_method {method!r}{hint}; known: {', '.join(methods)}")
        method = None
    method_keys = method_parameters(method) if method else ()

    base = raw.get("base_model")
    if base is None:
        problems.append("base_model is required (the model the task vectors are taken from)")
    base = _path(base, root, "base_model", problems) if base is not None else ""

    gparams = dict(raw.get("parameters") or {})
    if not isinstance(raw.get("parameters") or {}, Mapping):
        problems.append(f"parameters must be a mapping, got {raw.get('parameters')!r}")
        gparams = {}
    if method:
        _unknown(gparams, tuple(method_keys) + PER_MODEL_PARAMS, f"parameters (method {method!r})", problems)

    models_raw = raw.get("models")
    entries: list[ModelEntry] = []
    if not isinstance(models_raw, list) or not models_raw:
        problems.append("models must be a non-empty list of {model: path, parameters: {...}}")
        models_raw = []
    for i, m in enumerate(models_raw):
        where = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, Mapping):
            problems.append(f"{where} must be a mapping with 'model', got {m!r}")
            continue
        _unknown(m, MODEL_KEYS, where, problems)
        if "model" not in m:
            problems.append(f"{where}.model is required (path of a fine-tuned model)")
            continue
        p = dict(m.get("parameters") or {})
        _unknown(p, PER_MODEL_PARAMS, f"{where}.parameters", problems)
        for key in PER_MODEL_PARAMS:
            if key in p:
                lo, hi = (0.0, 1.0) if key in ("density", "gamma") else (None, None)
                _check_values(p[key], key, f"{where}.parameters", problems, lo, hi)
        if base and _path(m["model"], root, f"{where}.model", problems) == base:
            problems.append(f"{where}.model is the base model itself ({m['model']!r})")
        entries.append(ModelEntry(
            model=_path(m["model"], root, f"{where}.model", problems), parameters=p,
            calibration=_calibration(m.get("calibration"), root, f"{where}.calibration", problems),
        ))
    for key in PER_MODEL_PARAMS:
        if key in gparams:
            lo, hi = (0.0, 1.0) if key in ("density", "gamma") else (None, None)
            _check_values(gparams[key], key, "parameters", problems, lo, hi)

    trim = raw.get("trim")
    if trim is not None:
        if _is_rules(trim):
            for r in trim:
                _unknown(r, ("filter", "value"), "trim rule", problems)
        for v in spec_values(trim):
            if v not in TRIMS:
                problems.append(f"unknown trim {v!r}{_suggest(str(v), TRIMS)}; known trims: {', '.join(TRIMS)}")
        if method is not None and "trim" not in inspect.signature(get_method(method)).parameters:
            problems.append(f"merge_method {method!r} does not trim; remove 'trim' "
                            f"(methods that trim: ties, dare_linear, dare_ties, task_arithmetic, ...)")

    dtype = raw.get("dtype")
    if dtype is not None and str(dtype) not in DTYPES:
        problems.append(f"dtype {dtype!r} is not supported{_suggest(str(dtype), list(DTYPES))}")
    tok = raw.get("tokenizer_source", "base")
    if tok != "base":
        problems.append(f"tokenizer_source {tok!r} is not supported: only 'base' (vocabularies must match)")
    hs = raw.get("hessian_source", "merged")
    if hs not in HESSIAN_SOURCES:
        problems.append(f"unknown hessian_source {hs!r}{_suggest(str(hs), HESSIAN_SOURCES)}; "
                        f"one of {', '.join(HESSIAN_SOURCES)}")
    percdamp = raw.get("percdamp", 0.01)
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real) or not percdamp >= 0:
        problems.append(f"percdamp must be a number >= 0, got {percdamp!r}")
        percdamp = 0.01
    blocksize = _int(raw, "blocksize", 128, "", problems)
    prunen = _int(raw, "prunen", 0, "", problems, minimum=0)
    prunem = _int(raw, "prunem", 0, "", problems, minimum=0)
    if (prunen == 0) != (prunem == 0):
        problems.append(f"prunen and prunem go together (N:M pruning), got prunen={prunen}, prunem={prunem}")
    elif prunem and not (0 < prunen < prunem):
        problems.append(f"prunen must be in (0, prunem), got {prunen}:{prunem}")
    elif prunem and blocksize % prunem:
        problems.append(f"blocksize {blocksize} must be a multiple of prunem {prunem}")
    refit = raw.get("refit", False)
    if not isinstance(refit, bool):
        problems.append(f"refit must be true or false, got {refit!r}")
        refit = False
    calib = _calibration(raw.get("calibration"), root, "calibration", problems)

    cfg = MergeConfig(
        base_model=base, models=tuple(entries), merge_method=method or str(raw.get("merge_method")),
        parameters=gparams, trim=trim, dtype=DTYPES.get(str(dtype)) if dtype is not None else None,
        tokenizer_source="base", calibration=calib, hessian_source=hs if hs in HESSIAN_SOURCES else "merged",
        blocksize=blocksize, percdamp=float(percdamp), prunen=prunen, prunem=prunem, refit=refit,
        seed=_int(raw, "seed", 0, "", problems, minimum=0),
        batch_size=_int(raw, "batch_size", 8, "", problems),
        max_shard_size=str(raw.get("max_shard_size", "5GB")),
    )
    if method and entries:
        if cfg.needs_calibration():
            for t in range(len(entries)):
                if cfg.calibration_for(t) is None:
                    problems.append(
                        f"trim {cfg.trim!r} / method {method!r} needs calibration data: add "
                        f"'calibration: {{data: FILE}}' (top level, or models[{t}].calibration)")
                    break
        fn_params = inspect.signature(get_method(method)).parameters
        own_trim = fn_params["trim"].default if "trim" in fn_params else None
        if trim is None and own_trim is None:
            for t in range(len(entries)):
                dens = model_parameters(cfg, t).get("density")
                if any(isinstance(v, numbers.Real) and v < 1 for v in spec_values(dens)):
                    problems.append(f"models[{t}] has density < 1 but merge_method {method!r} does not trim by "
                                    "itself: add 'trim: magnitude' (or sparsegpt, wanda, random, ...)")
                    break
        if prunem and not any(v == "sparsegpt" for v in spec_values(trim)):
            problems.append("prunen/prunem (N:M) need trim: sparsegpt")
        if refit and not any(v == "sparsegpt" for v in spec_values(trim)):
            problems.append("refit: true refits what OBS kept: it needs trim: sparsegpt")
    if problems:
        raise ConfigError("invalid merge config:\n  - " + "\n  - ".join(problems))
    return cfg


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML merge config (relative paths resolved against its directory)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_config(raw or {}, root=p.parent)


def model_parameters(cfg: MergeConfig, t: int) -> dict[str, Any]:
    """Model `t`'s per-model parameter specs, falling back to the top-level `parameters`."""
    out = {k: cfg.parameters[k] for k in PER_MODEL_PARAMS if k in cfg.parameters}
    out.update(cfg.models[t].parameters)
    return out


def method_kwargs(cfg: MergeConfig, name: str, layer: int | None, num_layers: int) -> dict[str, Any]:
    """Method parameters resolved for one tensor (`lambda` -> `lambda_`), per-model keys excluded."""
    out = {}
    for k, spec in cfg.parameters.items():
        if k in PER_MODEL_PARAMS:
            continue
        out["lambda_" if k == "lambda" else k] = resolve_spec(spec, name, layer, num_layers)
    return out
