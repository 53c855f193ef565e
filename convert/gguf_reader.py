"""GGUF (llama.cpp) checkpoints as Hugging Face tensors: the llama family, phi3, gemma2/3 and the MoE families.

Tensors are dequantised to float32 one at a time (``gguf.quants.dequantize``)
from the memory-mapped file and renamed to Hugging Face names by the
architecture's ``gguf_block`` table (``convert.architectures``). What llama.cpp's
converter changed is undone, as transformers' GGUF loader does:

* llama / mistral / mixtral: the q/k row permutation for interleaved RoPE is inverted;
* gemma2 / gemma3: RMSNorm weights are stored as ``1 + w``; ``w = stored - 1`` in float32;
* MoE: experts stacked as one ``[E, out, in]`` tensor (``ffn_gate_exps`` ...) become
  E per-expert HF tensors (the names ``save_pretrained`` writes); a quantised
  stack is dequantised one expert's rows at a time (blocks never span rows);
* qwen2moe: a 1-D ``ffn_gate_inp_shexp`` is HF's ``[1, D]`` shared-expert gate.

The config is built from the GGUF metadata, with llama.cpp's own rules where it
stores nothing: its Mixtral is ``llama`` with expert tensors; phi3's LongRoPE
factors are the ``rope_factors_long`` / ``rope_factors_short`` tensors; gemma's
``query_pre_attn_scalar`` is the head dimension except for the 27B models
(gemma2 with 46 blocks, gemma3 with 62), where it is hidden / heads; gemma2
alternates sliding (even) and global (odd) layers, gemma3 makes every sixth
layer global (unless ``attention.sliding_window_pattern`` says otherwise) with
local RoPE base 10000 (unless ``rope.freq_base_swa``); qwen3moe normalises the
top-k routing weights and qwen2moe does not (unless ``expert_weights_norm``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf.quants import dequantize

from convert.architectures import GGUF_ARCHITECTURES, GGUF_MOE_VARIANTS, Architecture
from convert.errors import ConvertError
from convert.model_config import check_model_config
from sgtv_jax import numparse

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# phi3 LongRoPE: llama.cpp stores HF's rope_scaling factor lists as tensors.
_ROPE_FACTORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
# Blocks llama.cpp treats as the 27B model, whose query scale is 1/sqrt(hidden / heads).
_GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}
_QWEN_MOE = ("qwen2_moe", "qwen3_moe")


def gguf_to_hf_name(name: str, arch: Architecture) -> str:
    """Map one GGUF tensor name to its Hugging Face name; ``{e}`` in it marks a stack of experts."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in arch.gguf_block:
        return f"model.layers.{m.group(1)}.{arch.gguf_block[m.group(2)]}.{m.group(3)}"
    raise ConvertError(f"GGUF tensor {name!r} has no Hugging Face {arch.model_type} equivalent")


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


class _Source(NamedTuple):
    """Where one HF tensor lives in the file."""

    tensor: Any  # gguf.ReaderTensor
    expert: int | None  # index into a stacked [E, ...] expert tensor, or None
    shape: tuple[int, ...]  # the HF shape (numpy order)


_REQUIRED = object()
"""Default of `GGUFCheckpoint._int` / `_float`: the field must be present."""


class GGUFCheckpoint:
    """Lazy reader over one ``.gguf`` file, presenting Hugging Face tensors (float32)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: no such GGUF file")
        try:
            reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct errors/etc.
            raise ConvertError(f"{self.path}: not a readable GGUF file ({e})") from None
        self._reader: gguf.GGUFReader | None = reader
        arch_name = self._field("general.architecture")
        if arch_name not in GGUF_ARCHITECTURES:
            raise ConvertError(
                f"{self.path}: GGUF architecture {arch_name!r} is not supported; "
                f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
            )
        self.architecture: str = arch_name
        arch = GGUF_ARCHITECTURES[arch_name]
        if arch_name in GGUF_MOE_VARIANTS and any("_exps." in t.name for t in reader.tensors):
            arch = GGUF_MOE_VARIANTS[arch_name]
        self.arch: Architecture = arch
        self._tensors: dict[str, _Source] = {}
        self._rope_factors: dict[str, Any] = {}
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                # llama3-style RoPE scaling stored as a tensor: HF expresses it in
                # config.rope_parameters, which we cannot recover exactly here.
                raise ConvertError(f"{self.path}: tensor 'rope_freqs.weight' (llama3 RoPE scaling) is not supported")
            if t.name in _ROPE_FACTORS and arch.model_type == "phi3":
                self._rope_factors[_ROPE_FACTORS[t.name]] = t
                continue
            try:
                hf = gguf_to_hf_name(t.name, arch)
            except ConvertError as err:
                raise ConvertError(f"{self.path}: {err}") from None
            # GGUF lists dimensions fastest-first; numpy / PyTorch order is reversed.
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if hf.endswith("shared_expert_gate.weight") and len(shape) == 1:
                shape = (1, *shape)  # llama.cpp may store qwen2moe's [1, D] gate as [D]
            if "{e}" in hf:
                if len(shape) != 3:
                    raise ConvertError(
                        f"{self.path}: expert tensor {t.name!r} has shape {shape}, expected [E, out, in]"
                    )
                for expert in range(shape[0]):
                    self._tensors[hf.format(e=expert)] = _Source(t, expert, shape[1:])
            else:
                self._tensors[hf] = _Source(t, None, shape)
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

    def _number(self, key: str, value: Any, **bounds: Any) -> Any:
        """`value` of metadata `key` by the one rule (`sgtv_jax.numparse`); ConvertError naming file and key."""
        why = numparse.problem(value, **bounds)
        if why is not None:
            raise ConvertError(f"{self.path}: GGUF metadata {key} {why}, got {numparse.show(value)}")
        return int(value) if bounds.get("integer") else float(value)

    def _int(self, suffix: str, default: Any = _REQUIRED, lo: int = 1) -> Any:
        """Integer field `{arch}.{suffix}` (>= `lo`); `default` when absent (None passes through)."""
        v = self._require(suffix) if default is _REQUIRED else self._arch_field(suffix, default)
        return None if v is None else self._number(f"{self.architecture}.{suffix}", v, integer=True, lo=lo)

    def _float(self, suffix: str, default: Any = _REQUIRED) -> Any:
        """Finite real field `{arch}.{suffix}`; `default` when absent (None passes through)."""
        v = self._require(suffix) if default is _REQUIRED else self._arch_field(suffix, default)
        return None if v is None else self._number(f"{self.architecture}.{suffix}", v)

    def _build_config(self) -> dict[str, Any]:
        n_head = self._int("attention.head_count")
        n_kv = self._int("attention.head_count_kv", n_head)
        hidden = self._int("embedding_length")
        if self._arch_field("attention.key_length") is None and hidden % n_head:
            raise ConvertError(
                f"{self.path}: GGUF metadata {self.architecture}.attention.head_count {n_head} does not divide "
                f"{self.architecture}.embedding_length {hidden} (and no attention.key_length gives the head size)"
            )
        head_dim = self._int("attention.key_length", hidden // n_head)
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise ConvertError(f"{self.path}: no token_embd.weight tensor")
        vocab = self._int("vocab_size", None)
        if vocab is None:
            tokens = self._field("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens else int(embed.shape[0])
        arch = self.arch
        mt = arch.model_type
        # Qwen MoE blocks have no dense MLP: their intermediate_size defaults to the experts'.
        ff = self._int("feed_forward_length", None if mt in _QWEN_MOE else _REQUIRED)
        cfg: dict[str, Any] = {
            "architectures": [arch.hf_class],
            "model_type": mt,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": self._int("block_count"),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "max_position_embeddings": self._int("context_length", 2048),
            "rms_norm_eps": _f32_repr(self._float("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": _f32_repr(self._float("rope.freq_base", 10000.0)),
            },
            # llama.cpp drops output.weight when the head is tied to the embedding.
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "dtype": "float32",
        }
        if ff is not None:
            cfg["intermediate_size"] = ff
        if mt not in ("gemma2", "gemma3_text"):
            cfg["hidden_act"] = "silu"
        if mt == "llama":
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
            cfg["mlp_bias"] = False
        scaling = self._arch_field("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise ConvertError(f"{self.path}: RoPE scaling {scaling!r} is not supported")
            # gemma3: these become the global layers' parameters (llama.cpp scales only those, as HF does).
            cfg["rope_parameters"].update(rope_type="linear", factor=self._float("rope.scaling.factor"))
        if mt == "mixtral" or mt in _QWEN_MOE:
            cfg.update(self._moe_config())
            if "intermediate_size" not in cfg:
                cfg["intermediate_size"] = cfg["moe_intermediate_size"]
        elif mt == "phi3":
            cfg.update(self._phi3_config(cfg, head_dim))
        elif mt in ("gemma2", "gemma3_text"):
            cfg.update(self._gemma_config(cfg, head_dim))
        for gguf_key, hf_key in (
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ):
            v = self._field(gguf_key)
            if v is not None:
                cfg[hf_key] = self._number(gguf_key, v, integer=True, lo=0)
        check_model_config(cfg, f"{self.path}: config from GGUF metadata")
        return cfg

    def _moe_config(self) -> dict[str, Any]:
        """Expert counts and sizes (metadata, else the expert tensors' shapes)."""
        mt = self.arch.model_type
        n_layers = self._int("block_count")
        n_experts = self._int("expert_count")
        dense = [
            i for i in range(n_layers) if f"model.layers.{i}.{self.arch.gguf_block['ffn_gate_inp']}.weight" not in self
        ]
        if mt == "mixtral":
            if dense:
                raise ConvertError(f"{self.path}: block {dense[0]} has no expert router (ffn_gate_inp)")
            return {"num_local_experts": n_experts, "num_experts_per_tok": self._int("expert_used_count")}
        first = next(i for i in range(n_layers) if i not in dense) if len(dense) < n_layers else None
        if first is None:
            raise ConvertError(f"{self.path}: no block has expert tensors (ffn_gate_exps)")
        moe_ff = self._int("expert_feed_forward_length", None)
        if moe_ff is None:
            moe_ff = self.shape(f"model.layers.{first}.mlp.experts.0.gate_proj.weight")[0]
        out: dict[str, Any] = {
            "num_experts": n_experts,
            "num_experts_per_tok": self._int("expert_used_count"),
            "moe_intermediate_size": int(moe_ff),
            "decoder_sparse_step": 1,
            "mlp_only_layers": dense,
            # llama.cpp's qwen3moe graph normalises the top-k routing weights, its qwen2moe graph does not.
            "norm_topk_prob": bool(self._arch_field("expert_weights_norm", mt == "qwen3_moe")),
        }
        bias = f"model.layers.{first}.self_attn.q_proj.bias" in self
        if mt == "qwen2_moe":
            shared = self._int("expert_shared_feed_forward_length", None, lo=0)
            shared_name = f"model.layers.{first}.mlp.shared_expert.gate_proj.weight"
            if shared is None and shared_name in self:
                shared = self.shape(shared_name)[0]
            out["shared_expert_intermediate_size"] = int(shared or 0)
            out["qkv_bias"] = bias
        else:
            out["attention_bias"] = bias
        return out

    def _phi3_config(self, cfg: dict[str, Any], head_dim: int) -> dict[str, Any]:
        """Partial rotary, sliding window (0 = none, llama.cpp's Phi-4 marker) and LongRoPE factors."""
        rope = dict(cfg["rope_parameters"])
        rot = self._int("rope.dimension_count", None, lo=0)
        rope["partial_rotary_factor"] = rot / head_dim if rot else 1.0
        orig = self._int("rope.scaling.original_context_length", cfg["max_position_embeddings"])
        if self._rope_factors:
            if set(self._rope_factors) != set(_ROPE_FACTORS.values()):
                raise ConvertError(f"{self.path}: phi3 LongRoPE needs both rope_factors_long and rope_factors_short")
            rope.update(rope_type="longrope", original_max_position_embeddings=orig)
            for key, t in self._rope_factors.items():
                rope[key] = [_f32_repr(float(x)) for x in np.asarray(t.data, dtype=np.float32).ravel()]
        window = self._int("attention.sliding_window", 0, lo=0)
        return {"rope_parameters": rope, "original_max_position_embeddings": orig, "sliding_window": window or None}

    def _gemma_config(self, cfg: dict[str, Any], head_dim: int) -> dict[str, Any]:
        """Soft-caps, sliding / global layer pattern, query scale and (gemma3) per-layer-type RoPE."""
        n_layers, gemma3 = cfg["num_hidden_layers"], cfg["model_type"] == "gemma3_text"
        big = n_layers == _GEMMA_27B_BLOCKS[self.architecture]
        out: dict[str, Any] = {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if big else head_dim,
            "sliding_window": self._int("attention.sliding_window"),
        }
        attn_cap, final_cap = (None, None) if gemma3 else (50.0, 30.0)  # llama.cpp's defaults when absent
        attn_cap = self._float("attn_logit_softcapping", attn_cap)
        final_cap = self._float("final_logit_softcapping", final_cap)
        out["attn_logit_softcapping"] = None if attn_cap is None else _f32_repr(attn_cap)
        out["final_logit_softcapping"] = None if final_cap is None else _f32_repr(final_cap)
        pattern = self._arch_field("attention.sliding_window_pattern", 6 if gemma3 else 2)
        if isinstance(pattern, list):
            if len(pattern) != n_layers:
                raise ConvertError(
                    f"{self.path}: sliding_window_pattern has {len(pattern)} entries for {n_layers} blocks"
                )
            sliding = [bool(x) for x in pattern]
        else:
            # every pattern-th block is global: 0 (a division by zero) or a string is refused by name
            every = self._int("attention.sliding_window_pattern", pattern)
            sliding = [(i + 1) % every != 0 for i in range(n_layers)]
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        if gemma3:
            full = dict(cfg["rope_parameters"])
            if self._arch_field("rope.freq_base") is None:
                full["rope_theta"] = 1000000.0  # llama.cpp's gemma3 global default
            local = {"rope_type": "default", "rope_theta": _f32_repr(self._float("rope.freq_base_swa", 10000.0))}
            out["rope_parameters"] = {"sliding_attention": local, "full_attention": full}
        return out

    def hf_config(self) -> Any:
        """The config as a transformers ``PretrainedConfig`` (needs transformers)."""
        from transformers import AutoConfig  # noqa: PLC0415 (transformers takes ~2 s to import; only this path needs it)

        cfg = dict(self._config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    # -- Checkpoint interface -------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._source(name).shape

    def dtype(self, name: str) -> np.dtype:
        self._source(name)
        return np.dtype(np.float32)

    def _source(self, name: str) -> _Source:
        try:
            return self._tensors[name]
        except KeyError:
            raise ConvertError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str) -> np.ndarray:
        src = self._source(name)
        t = src.tensor
        # A quantised stack is [E, rows, bytes]: one expert's slice holds whole blocks.
        data = t.data if src.expert is None else t.data[src.expert]
        try:
            w = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - unsupported quant types raise NotImplementedError etc.
            raise ConvertError(f"{self.path}: cannot dequantise {t.name} ({t.tensor_type.name}): {e}") from None
        w = w.reshape(src.shape)
        if self.arch.gguf_norm_plus_one and t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        # llama.cpp permutes q/k rows for interleaved RoPE; NEOX-RoPE families (qwen2) store them as is.
        if self.arch.gguf_permuted_qk:
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
        return self._source(name).tensor.tensor_type.name

    def close(self) -> None:
        # GGUFReader holds a np.memmap; dropping our references unmaps it.
        self._tensors = {}
        self._rope_factors = {}
        self._reader = None

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
