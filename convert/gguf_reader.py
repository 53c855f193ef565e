"""GGUF (llama.cpp) checkpoints as Hugging Face LLaMA-family tensors (llama, mistral, qwen2, qwen3).

Tensors are dequantised to float32 one at a time (``gguf.quants.dequantize``)
from the memory-mapped file, renamed to Hugging Face names, and for LLaMA the
q/k row permutation that llama.cpp's converter applies (to turn HF's split-half
RoPE into interleaved RoPE) is inverted, as transformers' GGUF loader does.
The config is built from the GGUF metadata.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from convert.architectures import GGUF_ARCHITECTURES
from convert.errors import ConvertError

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str:
    """Map one GGUF tensor name to its Hugging Face LLaMA name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise ConvertError(f"GGUF tensor {name!r} has no Hugging Face LLaMA equivalent")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation: HF split-half rows -> interleaved rows.

    ``w`` is ``[n_head * head_dim, ...]`` (a q/k weight or bias); within each head
    the rows ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]``.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (interleaved rows -> HF split-half rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32_repr(x: float) -> float:
    # GGUF stores float32 metadata; 1e-5 reads back as 9.99999974e-06. The
    # shortest repr that round-trips through float32 is the value the model's
    # author wrote.
    return float(str(np.float32(x)))


class GGUFCheckpoint:
    """Lazy reader over one ``.gguf`` file, presenting HF LLaMA tensors (float32)."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: no such GGUF file")
        try:
            reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct errors/etc.
            raise ConvertError(f"{self.path}: not a readable GGUF file ({e})") from None
        self._reader: gguf.GGUFReader | None = reader
        arch = self._field("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ConvertError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; "
                f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
            )
        self.architecture: str = arch
        self._tensors = {}
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                # llama3-style RoPE scaling stored as a tensor: HF expresses it in
                # config.rope_parameters, which we cannot recover exactly here.
                raise ConvertError(f"{self.path}: tensor 'rope_freqs.weight' (llama3 RoPE scaling) is not supported")
            self._tensors[gguf_to_hf_name(t.name)] = t
        self._config = self._build_config()

    # -- metadata -------------------------------------------------------------

    def _field(self, key: str, default: Any = None) -> Any:
        if self._reader is None:
            raise ConvertError(f"{self.path}: the GGUF file is closed")
        f = self._reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def _arch_field(self, suffix: str, default: Any = None) -> Any:
        return self._field(f"{self.architecture}.{suffix}", default)

    def _require(self, suffix: str) -> Any:
        v = self._arch_field(suffix)
        if v is None:
            raise ConvertError(f"{self.path}: GGUF metadata lacks {self.architecture}.{suffix}")
        return v

    def _build_config(self) -> dict[str, Any]:
        n_head = int(self._require("attention.head_count"))
        n_kv = int(self._arch_field("attention.head_count_kv", n_head))
        hidden = int(self._require("embedding_length"))
        head_dim = int(self._arch_field("attention.key_length", hidden // n_head))
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise ConvertError(f"{self.path}: no token_embd.weight tensor")
        vocab = self._arch_field("vocab_size")
        if vocab is None:
            tokens = self._field("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens else int(embed.shape[-1])
        arch = GGUF_ARCHITECTURES[self.architecture]
        cfg: dict[str, Any] = {
            "architectures": [arch.hf_class],
            "model_type": arch.model_type,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._require("feed_forward_length")),
            "num_hidden_layers": int(self._require("block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "max_position_embeddings": int(self._arch_field("context_length", 2048)),
            "rms_norm_eps": _f32_repr(self._arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": _f32_repr(self._arch_field("rope.freq_base", 10000.0)),
            },
            "hidden_act": "silu",
            # llama.cpp drops output.weight when the head is tied to the embedding.
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "dtype": "float32",
        }
        if arch.model_type == "llama":
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
            cfg["mlp_bias"] = False
        scaling = self._arch_field("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise ConvertError(f"{self.path}: RoPE scaling {scaling!r} is not supported")
            cfg["rope_parameters"].update(rope_type="linear", factor=float(self._require("rope.scaling.factor")))
        for gguf_key, hf_key in (
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ):
            v = self._field(gguf_key)
            if v is not None:
                cfg[hf_key] = int(v)
        return cfg

    def hf_config(self) -> Any:
        """The config as a transformers ``PretrainedConfig`` (needs transformers)."""
        from transformers import AutoConfig

        cfg = dict(self._config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    # -- Checkpoint interface -------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; numpy / PyTorch order is reversed.
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def dtype(self, name: str) -> np.dtype:
        self._tensor(name)
        return np.dtype(np.float32)

    def _tensor(self, name: str) -> Any:
        try:
            return self._tensors[name]
        except KeyError:
            raise ConvertError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensor(name)
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - unsupported quant types raise NotImplementedError etc.
            raise ConvertError(f"{self.path}: cannot dequantise {t.name} ({t.tensor_type.name}): {e}") from None
        w = w.reshape(self.shape(name))
        # llama.cpp permutes q/k rows for interleaved RoPE; NEOX-RoPE families (qwen2) store them as is.
        if GGUF_ARCHITECTURES[self.architecture].gguf_permuted_qk:
            if ".self_attn.q_proj." in name:
                w = unpermute_qk(w, self._config["num_attention_heads"])
            elif ".self_attn.k_proj." in name:
                w = unpermute_qk(w, self._config["num_key_value_heads"])
        # Own the data: the reader's arrays are views into a memory map.
        return np.array(w, dtype=np.float32, copy=True)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names():
            yield name, self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def tensor_type(self, name: str) -> str:
        """The GGUF storage type (e.g. 'Q4_1', 'F32') of a tensor."""
        return self._tensor(name).tensor_type.name

    def close(self) -> None:
        # GGUFReader holds a np.memmap; dropping our references unmaps it.
        self._tensors = {}
        self._reader = None

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
