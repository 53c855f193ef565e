"""A GGUF file's tensors, config and tokenizer written as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.export import export_hf
from convert.gguf_reader import GGUFCheckpoint
from convert.gguf_tokenizer import save_gguf_tokenizer


def export_gguf(g: GGUFCheckpoint, dst: str | Path, **export_kwargs: Any) -> Path:
    """`export_hf` of an open GGUF checkpoint: its tensors in HF names, its config, and its tokenizer.

    The tokenizer is written before the directory is renamed into place (a model
    without it is incomplete); `export_kwargs` go to `export_hf` (dtype, shards, ...).
    """
    gguf_file = g.path
    return export_hf(
        iter(g),
        dst,
        config=dict(g.config),
        finalize=lambda tmp: save_gguf_tokenizer(gguf_file, tmp),
        **export_kwargs,
    )
