"""Gemma 2 and Gemma 3 (text) decoders in Flax NNX: ``gemma2``, ``gemma3_text``.

What differs from LLaMA:

* RMSNorm multiplies by ``(1 + weight)`` in float32 before casting back
  (the parameter holds HF's ``weight`` as is, so conversions stay byte-exact);
* the token embedding is multiplied by ``sqrt(hidden_size)`` rounded to the
  parameter dtype, as HF's scaled embedding does;
* GeGLU MLP (``hidden_activation``, tanh-approximated GELU);
* four norms per block: ``x + post_attention_layernorm(attn(input_layernorm(x)))``,
  then ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``;
* attention scores scaled by ``query_pre_attn_scalar ** -0.5``, optionally
  soft-capped ``cap * tanh(s / cap)`` before masking (gemma2), and logits
  soft-capped the same way (``final_logit_softcapping``);
* ``layer_types``: each block is ``sliding_attention`` (causal window of
  ``sliding_window`` keys) or ``full_attention``; gemma3 gives each type its own
  RoPE (``rope_parameters[layer_type]``) and adds per-head q/k RMSNorm.

Block-by-block interface as in ``sgtv_jax.models`` (capture keys are HF-local
linear names, e.g. ``self_attn.q_proj``). A block's layer type is a static
attribute, so sliding and full blocks have different graphdefs: take the
graphdef of each block (``split_block(model, i)``); ``apply_block`` compiles
once per layer type. ``block_kwargs`` holds the masks and positions for both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from .common import (
    Embed,
    FamilyModel,
    Linear,
    activation,
    apply_rope,
    attention_mask_bool,
    block_batch,
    default_positions,
    dot_product_attention,
    fixed_input_groups,
    forward,
    lm_head_unless_tied,
    rope_inv_freq,
    tied_logits,
)
from .decoder import INPUT_GROUPS, LINEAR_NAMES, DecoderAttention, DecoderConfig, hf_block_prefix, rope_settings

MODEL_TYPES = ("gemma2", "gemma3_text")
LAYER_TYPES = ("sliding_attention", "full_attention")
input_groups = fixed_input_groups(INPUT_GROUPS)


def _rope_tables(hf_config: Any, head_dim: int) -> tuple[tuple[str, tuple[tuple[float, ...], float]], ...]:
    """``((layer_type, (inv_freq, attention_scaling)), ...)`` for both layer types.

    gemma3 (v5) keys ``rope_parameters`` by layer type; gemma2 has one set for all.
    """
    params = rope_settings(hf_config)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    out = []
    for lt in LAYER_TYPES:
        p = params[lt] if isinstance(params.get(lt), dict) else params
        if "rope_theta" not in p:
            raise ValueError(f"config.rope_parameters for {lt} has no 'rope_theta'")
        out.append((lt, rope_inv_freq(head_dim, p, max_pos)))
    return tuple(out)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


@dataclasses.dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
    """Static hyper-parameters of a Gemma 2 / Gemma 3 text model (hashable): `DecoderConfig`'s, then these."""

    query_pre_attn_scalar: float
    layer_types: tuple[str, ...]
    rope: tuple[tuple[str, tuple[tuple[float, ...], float]], ...]
    sliding_window: int | None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    qk_norm: bool = False
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    param_dtype: Any = jnp.float32
    model_types: ClassVar[tuple[str, ...]] = MODEL_TYPES

    @classmethod
    def from_hf(cls, hf_config: Any, param_dtype: Any = jnp.float32) -> GemmaConfig:
        """Build from a transformers ``Gemma2Config`` / ``Gemma3TextConfig``."""
        core = cls.core_fields(hf_config)
        mt = core["model_type"]
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ValueError(f"{mt} with use_bidirectional_attention=True is not supported")
        head_dim, n = core["head_dim"], core["num_hidden_layers"]
        types = tuple(getattr(hf_config, "layer_types", None) or ("full_attention",) * n)
        bad = sorted(set(types) - set(LAYER_TYPES))
        if bad or len(types) != n:
            raise ValueError(f"{mt}: layer_types must list {n} of {LAYER_TYPES}; got {list(types)}")
        cap = getattr(hf_config, "attn_logit_softcapping", None)
        final = getattr(hf_config, "final_logit_softcapping", None)
        return cls(
            **core,
            query_pre_attn_scalar=float(hf_config.query_pre_attn_scalar),
            layer_types=types,
            rope=_rope_tables(hf_config, head_dim),
            sliding_window=getattr(hf_config, "sliding_window", None),
            attn_logit_softcapping=None if cap is None else float(cap),
            final_logit_softcapping=None if final is None else float(final),
            qk_norm=mt == "gemma3_text",
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            hidden_activation=getattr(hf_config, "hidden_activation", None) or "gelu_pytorch_tanh",
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            param_dtype=param_dtype,
        )

    def rope_for(self, layer_type: str) -> tuple[tuple[float, ...], float]:
        return dict(self.rope)[layer_type]


class GemmaRMSNorm(nnx.Module):
    """``x / rms(x) * (1 + scale)`` in float32, then cast to x's dtype (HF Gemma order of casts)."""

    def __init__(self, features: int, *, eps: float, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class GemmaAttention(DecoderAttention):
    def __init__(self, cfg: GemmaConfig, layer_type: str, *, rngs: nnx.Rngs):
        self.layer_type = layer_type
        bias = cfg.attention_bias
        super().__init__(cfg, qkv_bias=bias, o_bias=bias, norm=GemmaRMSNorm, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, caps: dict | None) -> jax.Array:
        """x ``[B, S, D]`` (already normed), mask ``[B, 1, S, S]`` -> ``[B, S, D]``."""
        cfg = self.cfg
        q, k, v = self.project(x, caps)
        inv, scaling = cfg.rope_for(self.layer_type)
        q = apply_rope(q, positions, inv, scaling)
        k = apply_rope(k, positions, inv, scaling)
        o = dot_product_attention(q, k, v, mask, cfg.query_pre_attn_scalar**-0.5, softcap=cfg.attn_logit_softcapping)
        return self.output(o, caps)


class GemmaMLP(nnx.Module):
    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.act_name = cfg.hidden_activation
        activation(cfg.hidden_activation)  # validate early
        self.gate_proj = Linear(d, f, use_bias=False, param_dtype=pd, rngs=rngs)
        self.up_proj = Linear(d, f, use_bias=False, param_dtype=pd, rngs=rngs)
        self.down_proj = Linear(f, d, use_bias=False, param_dtype=pd, rngs=rngs)

    def __call__(self, x: jax.Array, caps: dict | None) -> jax.Array:
        if caps is not None:
            caps["mlp.gate_proj"] = x
            caps["mlp.up_proj"] = x
        hdn = activation(self.act_name)(self.gate_proj(x)) * self.up_proj(x)
        if caps is not None:
            caps["mlp.down_proj"] = hdn
        return self.down_proj(hdn)


class GemmaBlock(nnx.Module):
    """Sandwich-norm decoder block of one layer type (static: part of the graphdef)."""

    def __init__(self, cfg: GemmaConfig, layer_type: str, *, rngs: nnx.Rngs):
        d, eps, pd = cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype
        self.layer_type = layer_type
        self.input_layernorm = GemmaRMSNorm(d, eps=eps, param_dtype=pd)
        self.self_attn = GemmaAttention(cfg, layer_type, rngs=rngs)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps=eps, param_dtype=pd)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps=eps, param_dtype=pd)
        self.mlp = GemmaMLP(cfg, rngs=rngs)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps=eps, param_dtype=pd)

    def __call__(self, x: jax.Array, *, masks: dict[str, jax.Array], positions: jax.Array, capture: bool = False):
        """x ``[B, S, D]``; ``masks[layer_type]`` ``[B, 1, S, S]`` bool; positions ``[B, S]``.

        Returns ``y`` or ``(y, captures)`` (linear inputs keyed by HF-local name).
        """
        caps: dict | None = {} if capture else None
        a = self.self_attn(self.input_layernorm(x), masks[self.layer_type], positions, caps)
        x = x + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(x), caps)
        x = x + self.post_feedforward_layernorm(m)
        return (x, caps) if capture else x


class GemmaForCausalLM(FamilyModel):
    """Gemma 2 / 3 text causal LM. ``__call__(input_ids [B,S], attention_mask [B,S]) -> logits [B,S,V]``."""

    config_class = GemmaConfig
    linear_names = LINEAR_NAMES

    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pd = cfg.param_dtype
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pd, rngs=rngs)
        self.blocks = nnx.List([GemmaBlock(cfg, lt, rngs=rngs) for lt in cfg.layer_types])
        self.norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.lm_head = lm_head_unless_tied(cfg, cfg.hidden_size, cfg.vocab_size, rngs)

    hf_block_prefix = staticmethod(hf_block_prefix)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids ``[B, S]`` -> ``[B, S, D]``, times ``sqrt(D)`` rounded to the parameter dtype like HF."""
        e = self.embed_tokens(input_ids)
        scale = jnp.asarray(self.config.hidden_size**0.5, jnp.float32).astype(e.dtype)
        return e * scale

    def block_kwargs(
        self,
        attention_mask: jax.Array | None,
        seq_len: int,
        batch: int | None = None,
        positions: jax.Array | None = None,
    ) -> dict[str, Any]:
        """``{"masks": {layer_type: [B,1,S,S]}, "positions": [B,S]}`` for every block."""
        batch = block_batch(attention_mask, batch)
        masks = {
            "full_attention": attention_mask_bool(attention_mask, batch, seq_len, causal=True),
            "sliding_attention": attention_mask_bool(
                attention_mask, batch, seq_len, causal=True, sliding_window=self.config.sliding_window
            ),
        }
        positions = default_positions(positions, batch, seq_len)
        return {"masks": masks, "positions": positions}

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm, LM head and final soft-cap: ``[B, S, D] -> [B, S, V]``."""
        x = self.norm(x)
        return _softcap(tied_logits(x, self.embed_tokens, self.lm_head), self.config.final_logit_softcapping)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        return forward(self, input_ids, attention_mask, positions=positions)


MODEL_CLASS = GemmaForCausalLM
"""The Flax model built for every ``model_type`` in ``MODEL_TYPES``."""
