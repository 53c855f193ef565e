"""Whole-checkpoint conversions: any supported source -> HF directory or Orbax."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from convert.atomic import prepare_output
from convert.checkpoint import Checkpoint, LazyTensors
from convert.errors import ConvertError
from convert.export import export_hf
from convert.gguf_export import export_gguf
from convert.gguf_reader import GGUFCheckpoint
from convert.namemaps import get_name_map
from convert.orbax_io import META_FILE as ORBAX_META_FILE
from convert.orbax_io import read_orbax_metadata, restore_orbax, save_orbax
from convert.readers import hf_config_object, open_checkpoint, validate_checkpoint
from sgtv_jax.models import build_abstract_model

_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def source_dtype(ckpt: Checkpoint) -> str:
    """The dtype a checkpoint declares (config 'dtype' / 'torch_dtype'), default fp32."""
    if isinstance(ckpt, GGUFCheckpoint):
        return "fp32"  # dequantised
    declared = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    return _CONFIG_DTYPES.get(str(declared), "fp32")


def convert_to_hf(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert a HF dir / pytorch_model.bin dir / .gguf file / Orbax checkpoint into a HF safetensors dir.

    Tensors stream one at a time from the source into shards of at most
    ``max_shard_size``; with ``dtype='auto'`` the source's dtype is kept (and
    then tensors are copied byte for byte). ``dst`` is checked first (see
    ``convert.atomic.prepare_output``): it may not be, contain or lie inside
    ``src``, and ``overwrite`` replaces only a previous output of this tool.
    """
    inputs = {"the source": src}
    prepare_output(dst, overwrite=overwrite, inputs=inputs)
    if (Path(src) / ORBAX_META_FILE).is_file():
        return _orbax_to_hf(
            src, dst, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress, inputs=inputs
        )
    with open_checkpoint(src) as ckpt:
        validate_checkpoint(ckpt)
        out_dtype = source_dtype(ckpt) if dtype == "auto" else dtype
        if isinstance(ckpt, GGUFCheckpoint):
            return export_gguf(
                ckpt,
                dst,
                dtype=out_dtype,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                progress=progress,
                inputs=inputs,
            )
        # Every tensor passes through from the base (UNCHANGED), cast if asked.
        return export_hf(
            {},
            dst,
            base=ckpt,
            dtype=out_dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
            inputs=inputs,
        )


def _orbax_to_hf(src: str | Path, dst: str | Path, *, dtype: str, inputs: dict[str, Any], **export_kwargs: Any) -> Path:
    """An Orbax checkpoint of ours -> HF directory (weights + config.json; Orbax holds no tokenizer)."""
    model, hf_config = restore_orbax(src)
    recorded = read_orbax_metadata(src).get("param_dtype") or "float32"
    out_dtype = _CONFIG_DTYPES.get(recorded, "fp32") if dtype == "auto" else dtype
    config = {**hf_config, "dtype": {v: k for k, v in _CONFIG_DTYPES.items()}[out_dtype]}
    return export_hf(flax_model_tensors(model), dst, config=config, dtype=out_dtype, inputs=inputs, **export_kwargs)


def load_flax_model(src: str | Path | Checkpoint, *, param_dtype: Any = None) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint into the matching Flax NNX model; returns ``(model, hf_config)``.

    Needs the architecture's name map (``convert.namemaps``) and the model
    registry (``sgtv_jax.models``).
    """

    ckpt = src if not isinstance(src, (str, Path)) else open_checkpoint(src)
    mt = validate_checkpoint(ckpt)
    cfg = dict(ckpt.config)
    abstract = build_abstract_model(hf_config_object(cfg), param_dtype=param_dtype or jnp.float32)
    nm = get_name_map(mt)
    loader = getattr(nm, "load_hf_state_dict_into_model", None)
    if loader is None:
        raise ConvertError(f"the {mt} name map has no load_hf_state_dict_into_model")
    return loader(abstract, LazyTensors(ckpt)), cfg


def convert_to_orbax(src: str | Path, dst: str | Path, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Convert any supported checkpoint into an Orbax checkpoint of the Flax model.

    ``dtype`` is the parameter dtype ('bf16' / 'fp16' / 'fp32'); 'auto' keeps the
    source's (GGUF: fp32). ``dst`` is checked before the weights load (as in
    :func:`convert_to_hf`).
    """

    inputs = {"the source": src}
    prepare_output(dst, overwrite=overwrite, inputs=inputs)
    with open_checkpoint(src) as ckpt:
        name = source_dtype(ckpt) if dtype == "auto" else dtype
        pd = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[name]
        model, cfg = load_flax_model(ckpt, param_dtype=pd)
    return save_orbax(model, dst, hf_config=cfg, overwrite=overwrite, inputs=inputs)


def flax_model_tensors(model: Any, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every parameter of a Flax NNX model, in HF layout.

    One parameter is copied to host at a time (lazy), in HF checkpoint order;
    ``dtype`` casts on the way out (default: keep the parameter's dtype).
    """
    yield from get_name_map(model.config.model_type).hf_tensors(model, dtype, error=ConvertError)


def export_flax_model(
    model: Any,
    dst: str | Path,
    *,
    base: str | Path | Checkpoint | None = None,
    hf_config: dict[str, Any] | None = None,
    dtype: str = "bf16",
    **export_kwargs: Any,
) -> Path:
    """Write a Flax NNX model as a Hugging Face directory (see :func:`export_hf`).

    ``base`` (a HF directory or open checkpoint) supplies config.json, tokenizer
    files and any tensors the model does not hold; otherwise ``hf_config`` (a
    dict) is required. Streams one parameter at a time.
    """
    ckpt = open_checkpoint(base) if isinstance(base, (str, Path)) else base
    try:
        return export_hf(flax_model_tensors(model), dst, base=ckpt, config=hf_config, dtype=dtype, **export_kwargs)
    finally:
        if isinstance(base, (str, Path)) and ckpt is not None:
            ckpt.close()
