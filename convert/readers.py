"""Open any supported checkpoint, check its architecture and tensor shapes.

``open_checkpoint(path)`` picks the reader from what is on disk:

* a ``.gguf`` file -> :class:`GGUFCheckpoint` (dequantised float32, HF names)
* a directory with ``model.safetensors`` or ``model.safetensors.index.json``
  -> :class:`SafetensorsCheckpoint`
* a directory with ``pytorch_model.bin`` (or its index) -> :class:`TorchBinCheckpoint`
  (needs torch; never unpickled any other way)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.architectures import ARCHITECTURES, SUPPORTED_MODEL_TYPES
from convert.checkpoint import Checkpoint
from convert.containment import contained_file
from convert.errors import ConvertError
from convert.gguf_reader import GGUFCheckpoint
from convert.namemaps import NameMap
from convert.safetensors_reader import INDEX_FILE as ST_INDEX
from convert.safetensors_reader import SINGLE_FILE as ST_SINGLE
from convert.safetensors_reader import SafetensorsCheckpoint
from convert.torch_reader import INDEX_FILE as PT_INDEX
from convert.torch_reader import SINGLE_FILE as PT_SINGLE
from convert.torch_reader import TorchBinCheckpoint
from sgtv_jax.errors import short_repr


def supported_architectures() -> tuple[str, ...]:
    """HF ``model_type`` values we have Flax models and name maps for (``convert.architectures``)."""
    return SUPPORTED_MODEL_TYPES


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint lazily (validates layout, reads no tensor data)."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".gguf":
            return GGUFCheckpoint(p)
        if p.name in (ST_SINGLE, PT_SINGLE, ST_INDEX, PT_INDEX) or p.suffix in (".safetensors", ".bin"):
            return open_checkpoint(p.parent)
        raise ConvertError(f"{p}: unrecognised checkpoint file (expected a .gguf file or a model directory)")
    if (p / ST_INDEX).is_file() or (p / ST_SINGLE).is_file():
        return SafetensorsCheckpoint(p)
    if (p / PT_INDEX).is_file() or (p / PT_SINGLE).is_file():
        return TorchBinCheckpoint(p)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        contained_file(p, ggufs[0].name, what="the folder's GGUF file")
        return GGUFCheckpoint(ggufs[0])
    raise ConvertError(
        f"{p}: no checkpoint found (looked for {ST_SINGLE}, {ST_INDEX}, {PT_SINGLE}, {PT_INDEX}, one *.gguf)"
    )


def check_architecture(config: dict[str, Any], where: str | Path) -> str:
    """Return ``config['model_type']`` or raise naming the supported ones."""
    mt = config.get("model_type")
    supported = supported_architectures()
    if mt not in supported:
        raise ConvertError(f"{where}: unsupported architecture {short_repr(mt)}; supported: {', '.join(supported)}")
    return str(mt)


def hf_config_object(config: dict[str, Any], where: str | Path = "config.json") -> Any:
    """A transformers ``PretrainedConfig`` from a config dict (local, no remote code).

    ConvertError naming `where` (the file the dict came from) and transformers'
    reason when transformers refuses the values (a field of the wrong type,
    heads that do not divide the hidden size, an unknown dtype, ...).
    """
    from transformers import AutoConfig  # noqa: PLC0415 (transformers takes ~2 s to import; only this path needs it)

    if not isinstance(config, dict):
        raise ConvertError(f"{where}: a model config must be a JSON object, got {type(config).__name__}")
    cfg = dict(config)
    mt = cfg.pop("model_type", None)
    for k in ("transformers_version", "_name_or_path", "_model_name_or_path"):
        cfg.pop(k, None)
    try:
        obj = AutoConfig.for_model(mt, **cfg)
    except Exception as e:  # noqa: BLE001 - its config classes raise strict-dataclass, Type, Value, Attribute errors
        reason = " ".join(str(e).split())[:300]
        raise ConvertError(f"{where}: transformers refuses this {mt!r} config: {reason}") from None
    _check_activations(obj, where)
    return obj


_ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function")


def _check_activations(obj: Any, where: str | Path) -> None:
    """An activation transformers does not know builds no model (KeyError when the model is built)."""
    try:
        from transformers.activations import ACT2FN  # noqa: PLC0415 (needs torch: checked only where it is installed)
    except ImportError:
        return
    for key in _ACTIVATION_KEYS:
        v = getattr(obj, key, None)
        if v is not None and (not isinstance(v, str) or v not in ACT2FN):
            raise ConvertError(f"{where}: {key} {v!r} is not an activation transformers knows")


def config_source(ckpt: Checkpoint) -> Path:
    """The file `ckpt`'s config comes from: a directory's config.json, else the checkpoint file (GGUF)."""
    p = Path(ckpt.path)
    return p / "config.json" if p.is_dir() else p


def config_problem(ckpt: Checkpoint) -> str | None:
    """Why `ckpt`'s config does not describe its tensors (copied into an output, it would not load), or None.

    For registered architectures whose name map takes the config (others are
    merged by name without a model, so nothing can be checked): the config
    must be one transformers builds, and every tensor must have its shape.
    """
    row = ARCHITECTURES.get(str(ckpt.config.get("model_type")))
    if row is None:
        return None
    try:
        obj = hf_config_object(ckpt.config, config_source(ckpt))
        try:
            row.name_map.rules(obj)
        except Exception:  # noqa: BLE001 - a feature the family lacks: no name map to check against
            return None
        validate_checkpoint(ckpt, require_all=False)
    except ConvertError as e:
        return str(e)
    return None


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """HF tensor name -> shape the config implies, from the architecture's name map.

    Falls back to the transformers PyTorch model built on the meta device (no
    memory, no init) when no name map is available; returns None when neither is.
    """
    nm = _name_map(str(config.get("model_type")))
    if nm is not None:
        return {k: tuple(v) for k, v in nm.expected_hf_tensors(hf_config_object(config)).items()}
    return _expected_shapes_from_transformers(config)


def _expected_shapes_from_transformers(config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    try:
        import torch  # noqa: PLC0415 (optional: shapes from the PyTorch class when installed)
        from transformers import AutoModel, AutoModelForCausalLM  # noqa: PLC0415 (transformers takes ~2 s to import; only this path needs it)
    except ImportError:
        return None
    cfg = hf_config_object(config)
    auto = AutoModel if config["model_type"] == "bert" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # tied: stored only as the embedding
    return shapes


def _name_map(model_type: str) -> NameMap | None:
    arch = ARCHITECTURES.get(model_type)
    return None if arch is None else arch.name_map


def validate_checkpoint(ckpt: Checkpoint, *, require_all: bool = True) -> str:
    """Check architecture and every tensor's shape against the config.

    Raises ConvertError naming the first tensor whose shape disagrees, a tensor
    the architecture does not have, or (``require_all``) one the config needs
    but the checkpoint lacks. Uses the architecture's name map; without one,
    the transformers model's shapes (meta device). Returns the model_type.
    """
    mt = check_architecture(ckpt.config, ckpt.path)
    nm = _name_map(mt)
    if nm is not None:
        cfg = hf_config_object(ckpt.config, config_source(ckpt))
        for name in ckpt.names():
            try:
                nm.check_hf_tensor(name, tuple(ckpt.shape(name)), cfg)
            except ValueError as e:
                raise ConvertError(f"{ckpt.path}: {e}") from None
        if require_all:
            present = {nm.canonical_name(n) for n in ckpt.names()}
            missing = [n for n in nm.expected_hf_tensors(cfg) if n not in present]
            if missing:
                raise ConvertError(
                    f"{ckpt.path}: tensor {missing[0]!r} is missing ({len(missing)} expected tensor(s) absent)"
                )
        return mt
    shapes = expected_shapes(ckpt.config)
    if shapes is None:
        return mt
    for name in ckpt.names():
        if name not in shapes:
            continue  # buffers such as position_ids, which the models recompute
        got = tuple(ckpt.shape(name))
        if got != shapes[name]:
            raise ConvertError(f"{ckpt.path}: tensor {name!r} has shape {got} but the config implies {shapes[name]}")
    if require_all:
        missing = [n for n in shapes if n not in ckpt]
        if missing:
            raise ConvertError(
                f"{ckpt.path}: tensor {missing[0]!r} is missing ({len(missing)} expected tensor(s) absent)"
            )
    return mt
