"""LLaMA-family decoder in Flax NNX: llama, mistral, qwen2 (q/k/v biases), SmolLM.

RMSNorm, split-half RoPE (from transformers v5 ``config.rope_parameters``,
including llama3 scaling), grouped-query attention, SwiGLU MLP, tied or untied
LM head, optional sliding-window attention (mistral).

Forward in pieces (for block-by-block pipelines)::

    x = model.embed(input_ids)                       # [B, S, D]
    kw = model.block_kwargs(attention_mask, S)       # {"mask": [B,1,S,S], "positions": [B,S]}
    for blk in model.blocks:
        x, caps = blk(x, capture=True, **kw)         # caps["self_attn.q_proj"]: [B, S, D]
    logits = model.head(x)                           # [B, S, V]

Flax parameter paths mirror HF names: ``("blocks", i, "self_attn", "q_proj",
"kernel")`` <-> ``model.layers.{i}.self_attn.q_proj.weight`` (transposed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .common import (Embed, Linear, RMSNorm, activation, apply_rope, attention_mask_bool,
                     dot_product_attention, rope_inv_freq)

MODEL_TYPES = ("llama", "mistral", "qwen2")


def hf_block_prefix(i: int) -> str:
    """HF tensor-name prefix of decoder block ``i``."""
    return f"model.layers.{i}."


# Linear layers of one block, in execution order: HF-local name -> (in, out) attr names.
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linear layers that read the same input tensor (one Hessian per group), in execution order.
INPUT_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """rope settings from a v5 config (``rope_parameters``), falling back to v4 fields."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    if "rope_theta" not in params:
        raise ValueError("config.rope_parameters has no 'rope_theta'")
    return params


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static hyper-parameters of a LLaMA-family model (hashable)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_inv_freq: tuple[float, ...]
    rope_attention_scaling: float = 1.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    rope_parameters: tuple[tuple[str, Any], ...] = ()
    param_dtype: Any = jnp.float32

    @classmethod
    def from_hf(cls, hf_config: Any, param_dtype: Any = jnp.float32) -> "LlamaConfig":
        """Build from a transformers ``LlamaConfig``/``MistralConfig``/``Qwen2Config``."""
        mt = hf_config.model_type
        if mt not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.from_hf: model_type {mt!r} not in {MODEL_TYPES}")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        rope = _rope_parameters(hf_config)
        inv, scaling = rope_inv_freq(head_dim, rope)
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        qkv_bias = True if mt == "qwen2" else attention_bias
        window = None
        if mt == "mistral":
            window = getattr(hf_config, "sliding_window", None)
        elif mt == "qwen2":
            types = getattr(hf_config, "layer_types", None) or []
            if any(t != "full_attention" for t in types):
                # Per-layer windows would give blocks different masks; not needed for released Qwen2.
                raise ValueError("qwen2 with use_sliding_window=True is not supported")
        act = getattr(hf_config, "hidden_act", "silu")
        kv = getattr(hf_config, "num_key_value_heads", None) or heads
        return cls(
            model_type=mt,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_inv_freq=inv,
            rope_attention_scaling=scaling,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias and mt != "qwen2",
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            hidden_act=act,
            sliding_window=window,
            rope_parameters=tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (dict, list)))),
            param_dtype=param_dtype,
        )


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, k, dh, pd = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                           cfg.head_dim, cfg.param_dtype)
        self.q_proj = Linear(d, h * dh, use_bias=cfg.qkv_bias, param_dtype=pd, rngs=rngs)
        self.k_proj = Linear(d, k * dh, use_bias=cfg.qkv_bias, param_dtype=pd, rngs=rngs)
        self.v_proj = Linear(d, k * dh, use_bias=cfg.qkv_bias, param_dtype=pd, rngs=rngs)
        self.o_proj = Linear(h * dh, d, use_bias=cfg.o_bias, param_dtype=pd, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, caps: dict | None) -> jax.Array:
        """x ``[B, S, D]`` (already normed) -> ``[B, S, D]``."""
        cfg = self.cfg
        b, s, _ = x.shape
        if caps is not None:
            for n in ("q_proj", "k_proj", "v_proj"):
                caps[f"self_attn.{n}"] = x
        q = self.q_proj(x).reshape(b, s, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, s, cfg.num_key_value_heads, cfg.head_dim)
        q = apply_rope(q, positions, cfg.rope_inv_freq, cfg.rope_attention_scaling)
        k = apply_rope(k, positions, cfg.rope_inv_freq, cfg.rope_attention_scaling)
        o = dot_product_attention(q, k, v, mask, cfg.head_dim ** -0.5).reshape(b, s, -1)
        if caps is not None:
            caps["self_attn.o_proj"] = o
        return self.o_proj(o)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.act_name = cfg.hidden_act
        self.gate_proj = Linear(d, f, use_bias=cfg.mlp_bias, param_dtype=pd, rngs=rngs)
        self.up_proj = Linear(d, f, use_bias=cfg.mlp_bias, param_dtype=pd, rngs=rngs)
        self.down_proj = Linear(f, d, use_bias=cfg.mlp_bias, param_dtype=pd, rngs=rngs)
        activation(cfg.hidden_act)  # validate early

    def __call__(self, x: jax.Array, caps: dict | None) -> jax.Array:
        if caps is not None:
            caps["mlp.gate_proj"] = x
            caps["mlp.up_proj"] = x
        hdn = activation(self.act_name)(self.gate_proj(x)) * self.up_proj(x)
        if caps is not None:
            caps["mlp.down_proj"] = hdn
        return self.down_proj(hdn)


class LlamaBlock(nnx.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        pd = cfg.param_dtype
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = LlamaMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array, positions: jax.Array, capture: bool = False):
        """x ``[B, S, D]``, mask ``[B, 1, S, S]`` bool, positions ``[B, S]`` int.

        Returns ``y [B, S, D]``, or ``(y, captures)`` with ``captures[name]`` the
        ``[B, S, in_features]`` input of each linear layer (HF-local names).
        """
        caps: dict | None = {} if capture else None
        x = x + self.self_attn(self.input_layernorm(x), mask, positions, caps)
        x = x + self.mlp(self.post_attention_layernorm(x), caps)
        return (x, caps) if capture else x


class LlamaForCausalLM(nnx.Module):
    """LLaMA-family causal LM. ``__call__(input_ids [B,S], attention_mask [B,S]) -> logits [B,S,V]``."""

    config_class = LlamaConfig
    linear_names = LINEAR_NAMES

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pd = cfg.param_dtype
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pd, rngs=rngs)
        self.blocks = nnx.List([LlamaBlock(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, param_dtype=pd, rngs=rngs))

    @staticmethod
    def hf_block_prefix(i: int) -> str:
        return hf_block_prefix(i)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids ``[B, S]`` -> hidden ``[B, S, D]``."""
        return self.embed_tokens(input_ids)

    def block_kwargs(self, attention_mask: jax.Array | None, seq_len: int, batch: int | None = None,
                     positions: jax.Array | None = None) -> dict[str, jax.Array]:
        """Keyword arguments every block takes: causal (+padding, +window) mask and positions.

        Positions default to ``arange(S)`` for every row, as transformers does
        when no ``position_ids`` are given.
        """
        if batch is None:
            if attention_mask is None:
                raise ValueError("pass batch when attention_mask is None")
            batch = attention_mask.shape[0]
        mask = attention_mask_bool(attention_mask, batch, seq_len, causal=True,
                                   sliding_window=self.config.sliding_window)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32)[None], (batch, seq_len))
        return {"mask": mask, "positions": positions}

    def head(self, x: jax.Array) -> jax.Array:
        """Final RMSNorm + LM head: ``[B, S, D] -> logits [B, S, V]`` (float32 for f32 params)."""
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed_tokens.attend(x)
        return self.lm_head(x)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        b, s = input_ids.shape
        kw = self.block_kwargs(attention_mask, s, batch=b, positions=positions)
        x = self.embed(input_ids)
        for blk in self.blocks:
            x = blk(x, **kw)
        return self.head(x)


MODEL_CLASS = LlamaForCausalLM
"""The Flax model built for every ``model_type`` in ``MODEL_TYPES``."""
