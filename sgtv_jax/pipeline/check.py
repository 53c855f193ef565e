"""`sgtv check CONFIG`: is this merge possible? Config, checkpoints and data, in seconds.

Reads only config.json, safetensors headers / index files and the calibration
files; no tensor data. Every problem is collected and reported at once
(`ConfigError`), so a merge never fails hours in on something knowable now:
different architectures, vocabulary sizes (never silently truncated), tensor
names or shapes, a missing or empty calibration file, a `seqlen` beyond the
model's maximum position.

A merge by tensor name (no calibration data needed; any architecture) is
checked by planning it (`byname.plan_by_name`): the rules for tensors that
differ between the models are those of the merge, and the summary names the
ones that apply. A merge that needs calibration data needs a Flax family of
the base's architecture, and every model to have the base's tensors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from convert.errors import ConvertError
from convert.export import model_files
from convert.lora import open_model
from convert.readers import config_problem, open_checkpoint, supported_architectures
from convert.safetensors_reader import read_config
from sgtv_jax._checks import tensor_mismatch
from sgtv_jax.pipeline.byname import plan_by_name
from sgtv_jax.pipeline.calibration import CalibrationError, check_files
from sgtv_jax.pipeline.config import ConfigError, MergeConfig
from sgtv_jax.pipeline.datafree import require_flax_family, uses_by_name
from sgtv_jax.pipeline.mapped import headers_plan
from sgtv_jax.pipeline.tokenizer import output_chat_template


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What `check` learned: architecture, block count, vocabulary, tensors per model, rules that apply."""

    model_type: str
    num_layers: int
    vocab_size: int
    max_positions: int | None
    tensors: int
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        head = (
            f"OK: {self.model_type}, {self.num_layers} blocks, vocabulary {self.vocab_size}, "
            f"{self.tensors} tensors per model"
        )
        return "\n  ".join((head,) + self.notes)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of a model directory (ConfigError naming the path if absent / invalid)."""

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: model path does not exist")
    directory = p if p.is_dir() else p.parent
    try:
        if p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf"))):
            ckpt = open_checkpoint(p)
            try:
                return dict(ckpt.config)
            finally:
                ckpt.close()
        return read_config(directory)
    except ConvertError as e:
        raise ConfigError(str(e)) from None


def base_model_type(cfg: MergeConfig) -> str:
    """The base model's `model_type` (its config; ConfigError naming `base_model` when unreadable)."""
    try:
        return str(read_hf_config(cfg.base_model).get("model_type"))
    except ConfigError as e:
        raise ConfigError(f"base_model: {e}") from None


def num_layers_of(hf: dict[str, Any]) -> int:
    return int(hf.get("num_hidden_layers", hf.get("n_layer", 0)))


def max_positions_of(hf: dict[str, Any]) -> int | None:
    v = hf.get("max_position_embeddings", hf.get("n_positions"))
    return int(v) if v is not None else None


def _shapes(path: str, adapter: str = "") -> dict[str, tuple[int, ...]]:

    ckpt = open_model(path, adapter)  # a LoRA adapter is checked against the model's shapes here
    try:
        return {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
    finally:
        ckpt.close()


def check_config(cfg: MergeConfig, *, data: bool = True, lora_rank: int | None = None) -> CheckResult:
    """Check compatibility of every checkpoint (and the calibration files when `data`), and the chat template.

    `lora_rank`: `sgtv merge --lora` will also extract the output's adapter
    against the base, so the output must have the base's tensors and shapes.
    Raises `ConfigError` listing every problem; returns a `CheckResult`.
    """
    result, saves_tokenizer = _check_models(cfg, data=data, lora_rank=lora_rank)
    if Path(cfg.base_model).is_dir():  # the files the output copies from the base resolve inside it
        model_files(cfg.base_model)
    output_chat_template(cfg, saves_tokenizer=saves_tokenizer)  # reads `auto`'s sources; refuses what cannot hold it
    return result


_MATCHING_KEYS = (
    "hidden_size",
    "n_embd",
    "num_hidden_layers",
    "n_layer",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)
"""Config keys every model of a merge with calibration data must share with the base (where the base sets them)."""


def _check_models(cfg: MergeConfig, *, data: bool, lora_rank: int | None) -> tuple[CheckResult, bool]:
    """`check_config` of the models and data; (result, whether the merge saves a tokenizer of its own)."""
    try:
        base = read_hf_config(cfg.base_model)
    except ConfigError as e:
        raise ConfigError(f"base_model: {e}") from None
    mt = base.get("model_type")
    if (cfg.slices or cfg.tokenizer is not None) and uses_by_name(cfg, str(mt)):
        # slices / a re-indexed vocabulary: their own plan
        if (mapped := _check_mapped(cfg, lora_rank)) is not None:
            return mapped
    if uses_by_name(cfg, str(mt)):
        return _check_by_name(cfg, base), False
    require_flax_family(cfg, str(mt))
    if mt not in supported_architectures():  # calibration data given for reconstruction errors only
        raise ConfigError(
            f"base_model {cfg.base_model_written or cfg.base_model}: unsupported architecture "
            f"{mt!r} for a merge with calibration data; supported: "
            f"{', '.join(supported_architectures())}"
        )
    problems = _config_problems(cfg, base)
    if problems:  # configs disagree: comparing tensors would only repeat it
        raise ConfigError("incompatible models:\n  - " + "\n  - ".join(problems))
    try:
        base_shapes = _shapes(cfg.base_model)
    except Exception as e:  # noqa: BLE001 - reader errors name the file
        raise ConfigError(f"base_model: {e}") from None
    problems = _tensor_problems(cfg, base_shapes)
    max_pos = max_positions_of(base)
    if data:
        _add_data_problems(cfg, max_pos, problems)
    if problems:
        raise ConfigError("merge check failed:\n  - " + "\n  - ".join(problems))
    return CheckResult(str(mt), num_layers_of(base), int(base.get("vocab_size") or 0), max_pos, len(base_shapes)), False


def _config_problems(cfg: MergeConfig, base: dict[str, Any]) -> list[str]:
    """Each model's config.json against the base's: readable, same architecture, vocabulary and sizes."""
    problems: list[str] = []
    mt = base.get("model_type")
    vocab = base.get("vocab_size")
    for i, m in enumerate(cfg.models):
        try:
            c = read_hf_config(m.model)
        except ConfigError as e:
            problems.append(f"models[{i}]: {e}")
            continue
        if c.get("model_type") != mt:
            problems.append(
                f"models[{i}] {m.model}: architecture {c.get('model_type')!r} differs from the base model's {mt!r}"
            )
            continue
        if c.get("vocab_size") != vocab:
            problems.append(
                f"models[{i}] {m.model}: vocabulary size {c.get('vocab_size')} differs from the "
                f"base model's {vocab} (vocabularies must match; nothing is truncated)"
            )
        for key in _MATCHING_KEYS:
            if key in base and c.get(key) != base.get(key):
                problems.append(
                    f"models[{i}] {m.model}: {key} = {c.get(key)!r} differs from the base model's {base.get(key)!r}"
                )
    return problems


def _tensor_problems(cfg: MergeConfig, base_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Each model's tensor names and shapes (headers) against the base's `base_shapes`."""
    problems: list[str] = []
    for i, m in enumerate(cfg.models):
        try:
            shapes = _shapes(m.model, m.adapter)
        except Exception as e:  # noqa: BLE001
            problems.append(f"models[{i}]: {e}")
            continue
        missing, extra, differ = tensor_mismatch(base_shapes, shapes)
        if missing:
            problems.append(f"models[{i}] {m.model} lacks {len(missing)} tensor(s) of the base: {missing[:5]}")
        if extra:
            problems.append(f"models[{i}] {m.model} has {len(extra)} tensor(s) the base lacks: {extra[:5]}")
        bad = [f"{n!r} {shapes[n]} vs base {base_shapes[n]}" for n in differ]
        if bad:
            problems.append(f"models[{i}] {m.model}: tensor shapes differ: {', '.join(bad[:5])}")
    return problems


def _add_data_problems(cfg: MergeConfig, max_pos: int | None, problems: list[str]) -> None:
    """Append to `problems` what is wrong with each distinct calibration (seqlen, files) and the base's tokenizer."""
    seen = set()
    for t in range(len(cfg.models)):
        cal = cfg.calibration_for(t)
        if cal is None or id(cal) in seen:
            continue
        seen.add(id(cal))
        where = f"models[{t}].calibration" if cfg.models[t].calibration else "calibration"
        if max_pos is not None and cal.seqlen > max_pos:
            key, note = calibration_key(cfg, t, "seqlen")
            msg = f"{key} {cal.seqlen} exceeds the model's maximum of {max_pos} positions{note}"
            if msg not in problems:  # a top-level value inherited by several models: once
                problems.append(msg)
        try:
            check_files(cal.data, cal.text_field)
        except CalibrationError as e:
            problems.append(f"{where}: {e}")
    if seen and not any((Path(cfg.base_model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        problems.append(f"base_model {cfg.base_model}: no tokenizer files (needed to tokenise calibration data)")


def calibration_key(cfg: MergeConfig, t: int, key: str) -> tuple[str, str]:
    """(the key that set model `t`'s calibration value of `key`, a note for an unwritten one) for messages.

    Its own `models[t].calibration.KEY`, else the top level's (which a model's
    own calibration inherits), else neither: the default.
    """
    own, top = cfg.models[t].calibration, cfg.calibration
    if own is not None and key in own.given:
        return f"models[{t}].calibration.{key}", ""
    if top is not None and key in top.given:
        return f"calibration.{key}", ""
    if own is None:
        return f"calibration.{key}", f" ({key} is not set: the default)"
    return (
        f"models[{t}].calibration.{key}",
        f" ({key} is set neither there nor in the top-level calibration: the default)",
    )


def _check_by_name(cfg: MergeConfig, base: dict[str, Any]) -> CheckResult:
    """Check a merge by tensor name: plan it from the headers (every problem at once)."""

    problems: list[str] = []
    base_label = f"base_model ({cfg.base_model_written or cfg.base_model})"
    try:
        base_ckpt = open_checkpoint(cfg.base_model)
    except ConvertError as e:
        raise ConfigError(f"base_model: {e}") from None
    opened = []
    try:
        for i, m in enumerate(cfg.models):
            try:
                opened.append(open_checkpoint(m.model))
            except ConvertError as e:
                problems.append(f"models[{i}]: {e}")
        # the output carries the base's config.json: it must describe the base's tensors
        if (why := config_problem(base_ckpt)) is not None:
            problems.append(f"base_model: {why}")
        if problems:
            raise ConfigError("merge check failed:\n  - " + "\n  - ".join(problems))
        plan = plan_by_name(
            base_ckpt,
            opened,
            base_label=base_label,
            labels=[f"models[{i}] ({m.label})" for i, m in enumerate(cfg.models)],
        )
        tensors = len(base_ckpt.names())
    finally:
        for c in [base_ckpt] + opened:
            c.close()
    notes = tuple(f"{r['tensor']}: {r['rule']} ({r['detail']})" for r in plan.rules)
    if any(cfg.calibration_for(t) is not None for t in range(len(cfg.models))):
        notes += (
            f"calibration data unused: no tensor needs it and {plan.model_type!r} has no Flax family "
            "to measure reconstruction errors with",
        )
    return CheckResult(
        plan.model_type,
        plan.num_layers,
        int(plan.vocab_size or 0),
        max_positions_of(base),
        tensors,
        ("merged by tensor name (data-free)",) + notes,
    )


def _check_mapped(cfg: MergeConfig, lora_rank: int | None = None) -> tuple[CheckResult, bool] | None:
    """`sgtv check` of a mapped config (a `CheckResult`, whether it saves a tokenizer), or None: the usual check."""
    planned = headers_plan(cfg)
    if planned is None:
        return None
    plan, vm = planned
    if lora_rank is not None:
        _check_lora_layout(cfg, plan, lora_rank)
    notes = tuple(f"{r['tensor']}: {r['rule']} ({r['detail']})" for r in plan.rules)
    if vm is not None:
        notes += (f"tokenizer {cfg.tokenizer_source}: {vm.size} rows, {len(vm.added)} token(s) the base lacks",)
    result = CheckResult(
        plan.model_type,
        plan.num_layers,
        int(plan.vocab_size or 0),
        max_positions_of(plan.config),
        len(plan.entries),
        ("merged by tensor name (data-free)",) + notes,
    )
    return result, vm is not None and vm.tokenizer is not None


def _check_lora_layout(cfg: MergeConfig, plan: Any, rank: int) -> None:
    """`--lora`: the adapter is the output minus the base, so the output needs the base's tensors and shapes.

    Only a mapped output (slices, a re-indexed vocabulary) can differ from the
    base's layout; a frankenmerge that stacks more or fewer layers has no
    single model to extract an adapter against, and is refused before any work.
    """
    try:
        want = _shapes(cfg.base_model)
    except ConvertError as e:
        raise ConfigError(f"base_model: {e}") from None
    have = {e.name: tuple(e.shape) for e in plan.entries}
    extra = [n for n in have if n not in want]
    missing = [n for n in want if n not in have]
    differ = [n for n in have if n in want and have[n] != want[n]]
    if not (extra or missing or differ):
        return
    if extra:
        what = f"has {len(extra)} tensor(s) the base lacks, e.g. {extra[0]!r}"
    elif missing:
        what = f"lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}"
    else:
        what = f"has {differ[0]!r} of shape {list(have[differ[0]])} where the base's is {list(want[differ[0]])}"
    base = cfg.base_model_written or cfg.base_model
    whose = (
        "the merge's output (slices: "
        + ", ".join(f"{s.label} layers {list(s.layer_range)}" for sl in cfg.slices for s in sl.sources[:1])
        + f"; {plan.num_layers} layers)"
        if cfg.slices
        else "the merge's output (its re-indexed vocabulary)"
    )
    raise ConfigError(
        f"--lora {rank}: an adapter is the output minus the base model ({base}: the config's base_model, or "
        f"the first slice's first source without one), and {whose} {what}; a LoRA adapter needs the base's "
        "tensors and shapes: drop --lora, or set base_model to a model with the output's layout"
    )
