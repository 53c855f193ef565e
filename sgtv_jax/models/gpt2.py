"""GPT-2 decoder in Flax NNX.

Learned absolute positions, pre-LN blocks, fused ``c_attn`` (kept fused: one
``[D, 3D]`` kernel, exactly HF's Conv1D layout, so no transpose anywhere),
``gelu_new`` MLP, LM head tied to ``wte`` unless ``tie_word_embeddings=False``.

Forward in pieces::

    x = model.embed(input_ids)                  # [B, S, D]  (wte + wpe)
    kw = model.block_kwargs(attention_mask, S)  # {"mask": [B, 1, S, S]}
    for blk in model.blocks:
        x, caps = blk(x, capture=True, **kw)    # caps["attn.c_attn"]: [B, S, D]
    logits = model.head(x)                      # ln_f + head, [B, S, V]

Flax paths: ``("blocks", i, "attn", "c_attn", "kernel")`` <->
``transformer.h.{i}.attn.c_attn.weight``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .common import (
    Embed,
    FamilyModel,
    LayerNorm,
    Linear,
    activation,
    attention_mask_bool,
    block_batch,
    dot_product_attention,
    fixed_input_groups,
    forward,
    lm_head_unless_tied,
    tied_logits,
)

MODEL_TYPES = ("gpt2",)
LINEAR_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Linear layers that read the same input tensor (one Hessian per group): here each its own.
INPUT_GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))


input_groups = fixed_input_groups(INPUT_GROUPS)


def hf_block_prefix(i: int) -> str:
    """HF tensor-name prefix of block ``i`` (GPT2LMHeadModel naming)."""
    return f"transformer.h.{i}."


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Static hyper-parameters of a GPT-2 model (hashable)."""

    model_type: str
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    param_dtype: Any = jnp.float32

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @classmethod
    def from_hf(cls, hf_config: Any, param_dtype: Any = jnp.float32) -> GPT2Config:
        """Build from a transformers ``GPT2Config``."""
        if hf_config.model_type not in MODEL_TYPES:
            raise ValueError(f"GPT2Config.from_hf: model_type {hf_config.model_type!r} is not gpt2")
        if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
            # A per-layer scale would make blocks differ; no released GPT-2 uses it.
            raise ValueError("gpt2 with scale_attn_by_inverse_layer_idx=True is not supported")
        if getattr(hf_config, "add_cross_attention", False):
            raise ValueError("gpt2 with cross attention is not supported")
        return cls(
            model_type="gpt2",
            vocab_size=hf_config.vocab_size,
            n_positions=hf_config.n_positions,
            n_embd=hf_config.n_embd,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_inner=hf_config.n_inner or 4 * hf_config.n_embd,
            layer_norm_epsilon=float(hf_config.layer_norm_epsilon),
            activation_function=hf_config.activation_function,
            scale_attn_weights=bool(hf_config.scale_attn_weights),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            param_dtype=param_dtype,
        )


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.n_embd
        self.c_attn = Linear(d, 3 * d, use_bias=True, param_dtype=cfg.param_dtype, rngs=rngs)
        self.c_proj = Linear(d, d, use_bias=True, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, caps: dict | None) -> jax.Array:
        cfg = self.cfg
        b, s, d = x.shape
        dh = d // cfg.n_head
        if caps is not None:
            caps["attn.c_attn"] = x
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(b, s, cfg.n_head, dh) for t in (q, k, v))
        scale = dh**-0.5 if cfg.scale_attn_weights else 1.0
        o = dot_product_attention(q, k, v, mask, scale).reshape(b, s, d)
        if caps is not None:
            caps["attn.c_proj"] = o
        return self.c_proj(o)


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.act_name = cfg.activation_function
        activation(self.act_name)  # validate early
        self.c_fc = Linear(cfg.n_embd, cfg.n_inner, use_bias=True, param_dtype=cfg.param_dtype, rngs=rngs)
        self.c_proj = Linear(cfg.n_inner, cfg.n_embd, use_bias=True, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, caps: dict | None) -> jax.Array:
        if caps is not None:
            caps["mlp.c_fc"] = x
        h = activation(self.act_name)(self.c_fc(x))
        if caps is not None:
            caps["mlp.c_proj"] = h
        return self.c_proj(h)


class GPT2Block(nnx.Module):
    """Pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        eps, pd = cfg.layer_norm_epsilon, cfg.param_dtype
        self.ln_1 = LayerNorm(cfg.n_embd, eps=eps, param_dtype=pd)
        self.attn = GPT2Attention(cfg, rngs=rngs)
        self.ln_2 = LayerNorm(cfg.n_embd, eps=eps, param_dtype=pd)
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array, capture: bool = False):
        """x ``[B, S, D]``, mask ``[B, 1, S, S]`` -> y, or ``(y, captures)`` when ``capture``."""
        caps: dict | None = {} if capture else None
        x = x + self.attn(self.ln_1(x), mask, caps)
        x = x + self.mlp(self.ln_2(x), caps)
        return (x, caps) if capture else x


class GPT2LMHeadModel(FamilyModel):
    """GPT-2 LM. ``__call__(input_ids [B,S], attention_mask [B,S]) -> logits [B,S,V]``."""

    config_class = GPT2Config
    linear_names = LINEAR_NAMES

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        pd = cfg.param_dtype
        self.wte = Embed(cfg.vocab_size, cfg.n_embd, param_dtype=pd, rngs=rngs)
        self.wpe = Embed(cfg.n_positions, cfg.n_embd, param_dtype=pd, rngs=rngs)
        self.blocks = nnx.List([GPT2Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, param_dtype=pd)
        self.lm_head = lm_head_unless_tied(cfg, cfg.n_embd, cfg.vocab_size, rngs)

    hf_block_prefix = staticmethod(hf_block_prefix)

    def embed(self, input_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """input_ids ``[B, S]`` -> ``wte + wpe`` ``[B, S, D]`` (positions default ``arange(S)``)."""
        if positions is None:
            positions = jnp.arange(input_ids.shape[1])[None, :]
        return self.wte(input_ids) + self.wpe(positions)

    def block_kwargs(
        self, attention_mask: jax.Array | None, seq_len: int, batch: int | None = None
    ) -> dict[str, jax.Array]:
        """``{"mask": [B, 1, S, S]}``: causal and padding."""
        batch = block_batch(attention_mask, batch)
        return {"mask": attention_mask_bool(attention_mask, batch, seq_len, causal=True)}

    def head(self, x: jax.Array) -> jax.Array:
        """``ln_f`` + LM head: ``[B, S, D] -> [B, S, V]``."""
        return tied_logits(self.ln_f(x), self.wte, self.lm_head)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return forward(self, input_ids, attention_mask)


MODEL_CLASS = GPT2LMHeadModel
"""The Flax model built for every ``model_type`` in ``MODEL_TYPES``."""
