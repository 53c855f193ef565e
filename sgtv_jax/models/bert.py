"""BERT encoder in Flax NNX (e.g. all-MiniLM-L6-v2).

Embeddings (word + absolute position + token type, then LayerNorm), post-LN
blocks with exact (erf) GELU, optional pooler (``tanh(dense(h[:, 0]))``).
``__call__`` returns the last hidden state ``[B, S, D]``; ``mean_pool`` gives
the sentence-transformers mean over real tokens.

Forward in pieces::

    x = model.embed(input_ids, token_type_ids)     # [B, S, D]
    kw = model.block_kwargs(attention_mask, S)     # {"mask": [B, 1, S, S]} (bidirectional)
    for blk in model.blocks:
        x, caps = blk(x, capture=True, **kw)       # caps["attention.self.query"]: [B, S, D]
    h = model.head(x)                              # identity: post-LN blocks end normed

Flax paths mirror HF BertModel names: ``("blocks", i, "attention", "self",
"query", "kernel")`` <-> ``encoder.layer.{i}.attention.self.query.weight``.
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
)

MODEL_TYPES = ("bert",)
LINEAR_NAMES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
# Linear layers that read the same input tensor (one Hessian per group), in execution order.
INPUT_GROUPS = (
    ("attention.self.query", "attention.self.key", "attention.self.value"),
    ("attention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)


input_groups = fixed_input_groups(INPUT_GROUPS)


def hf_block_prefix(i: int) -> str:
    """HF tensor-name prefix of encoder block ``i`` (BertModel naming, no ``bert.``)."""
    return f"encoder.layer.{i}."


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Static hyper-parameters of a BERT encoder (hashable)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    add_pooling_layer: bool = True
    param_dtype: Any = jnp.float32

    @classmethod
    def from_hf(cls, hf_config: Any, param_dtype: Any = jnp.float32, add_pooling_layer: bool = True) -> BertConfig:
        """Build from a transformers ``BertConfig``."""
        if hf_config.model_type not in MODEL_TYPES:
            raise ValueError(f"BertConfig.from_hf: model_type {hf_config.model_type!r} is not bert")
        pet = getattr(hf_config, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"bert position_embedding_type {pet!r} is not supported (only 'absolute')")
        return cls(
            model_type="bert",
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            type_vocab_size=hf_config.type_vocab_size,
            layer_norm_eps=float(hf_config.layer_norm_eps),
            hidden_act=hf_config.hidden_act,
            add_pooling_layer=add_pooling_layer,
            param_dtype=param_dtype,
        )


class _Module(nnx.Module):
    """Attribute container so Flax paths follow HF's nesting (``attention.self.query``)."""


class BertBlock(nnx.Module):
    """Post-LN encoder block: ``a = LN(x + attn(x))``; ``y = LN(a + W2 gelu(W1 a))``."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, pd, eps = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype, cfg.layer_norm_eps
        activation(cfg.hidden_act)  # validate early
        attn_self = _Module()
        attn_self.query = Linear(d, d, use_bias=True, param_dtype=pd, rngs=rngs)
        attn_self.key = Linear(d, d, use_bias=True, param_dtype=pd, rngs=rngs)
        attn_self.value = Linear(d, d, use_bias=True, param_dtype=pd, rngs=rngs)
        attn_out = _Module()
        attn_out.dense = Linear(d, d, use_bias=True, param_dtype=pd, rngs=rngs)
        attn_out.LayerNorm = LayerNorm(d, eps=eps, param_dtype=pd)
        self.attention = _Module()
        self.attention.self = attn_self
        self.attention.output = attn_out
        self.intermediate = _Module()
        self.intermediate.dense = Linear(d, f, use_bias=True, param_dtype=pd, rngs=rngs)
        self.output = _Module()
        self.output.dense = Linear(f, d, use_bias=True, param_dtype=pd, rngs=rngs)
        self.output.LayerNorm = LayerNorm(d, eps=eps, param_dtype=pd)

    def __call__(self, x: jax.Array, *, mask: jax.Array, capture: bool = False):
        """x ``[B, S, D]``, mask ``[B, 1, S, S]`` -> y, or ``(y, captures)`` when ``capture``."""
        cfg = self.cfg
        caps: dict | None = {} if capture else None
        b, s, d = x.shape
        h, dh = cfg.num_attention_heads, d // cfg.num_attention_heads
        sa = self.attention.self
        if caps is not None:
            for n in ("query", "key", "value"):
                caps[f"attention.self.{n}"] = x
        q = sa.query(x).reshape(b, s, h, dh)
        k = sa.key(x).reshape(b, s, h, dh)
        v = sa.value(x).reshape(b, s, h, dh)
        ctx = dot_product_attention(q, k, v, mask, dh**-0.5).reshape(b, s, d)
        if caps is not None:
            caps["attention.output.dense"] = ctx
        a = self.attention.output.LayerNorm(self.attention.output.dense(ctx) + x)
        if caps is not None:
            caps["intermediate.dense"] = a
        inter = activation(cfg.hidden_act)(self.intermediate.dense(a))
        if caps is not None:
            caps["output.dense"] = inter
        y = self.output.LayerNorm(self.output.dense(inter) + a)
        return (y, caps) if capture else y


class BertModel(FamilyModel):
    """BERT encoder. ``__call__(input_ids [B,S], attention_mask [B,S]) -> hidden [B,S,D]``."""

    config_class = BertConfig
    linear_names = LINEAR_NAMES

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d, pd = cfg.hidden_size, cfg.param_dtype
        self.embeddings = _Module()
        self.embeddings.word_embeddings = Embed(cfg.vocab_size, d, param_dtype=pd, rngs=rngs)
        self.embeddings.position_embeddings = Embed(cfg.max_position_embeddings, d, param_dtype=pd, rngs=rngs)
        self.embeddings.token_type_embeddings = Embed(cfg.type_vocab_size, d, param_dtype=pd, rngs=rngs)
        self.embeddings.LayerNorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=pd)
        self.blocks = nnx.List([BertBlock(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        if cfg.add_pooling_layer:
            self.pooler: _Module | None = _Module()
            self.pooler.dense = Linear(d, d, use_bias=True, param_dtype=pd, rngs=rngs)
        else:
            self.pooler = None

    hf_block_prefix = staticmethod(hf_block_prefix)

    def embed(
        self, input_ids: jax.Array, token_type_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """``[B, S]`` ids -> ``LN(word + position + token_type)`` ``[B, S, D]``."""
        e = self.embeddings
        if positions is None:
            positions = jnp.arange(input_ids.shape[1])[None, :]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = e.word_embeddings(input_ids) + e.token_type_embeddings(token_type_ids)
        x = x + e.position_embeddings(positions)
        return e.LayerNorm(x)

    def block_kwargs(
        self, attention_mask: jax.Array | None, seq_len: int, batch: int | None = None
    ) -> dict[str, jax.Array]:
        """``{"mask": [B, 1, S, S]}``: bidirectional, padding keys masked."""
        batch = block_batch(attention_mask, batch)
        return {"mask": attention_mask_bool(attention_mask, batch, seq_len, causal=False)}

    def head(self, x: jax.Array) -> jax.Array:
        """Identity: the last block's output is the last hidden state ``[B, S, D]``."""
        return x

    def pool(self, x: jax.Array) -> jax.Array:
        """HF pooler: ``tanh(dense(x[:, 0]))`` ``[B, D]``."""
        if self.pooler is None:
            raise ValueError("model was built without a pooling layer")
        return jnp.tanh(self.pooler.dense(x[:, 0]))

    @staticmethod
    def mean_pool(x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """Mean over real tokens (sentence-transformers pooling): ``[B, S, D] -> [B, D]``."""
        if attention_mask is None:
            return jnp.mean(x, axis=1)
        m = attention_mask.astype(x.dtype)[..., None]
        return jnp.sum(x * m, axis=1) / jnp.clip(jnp.sum(m, axis=1), 1e-9)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        return forward(self, input_ids, attention_mask, token_type_ids)


MODEL_CLASS = BertModel
"""The Flax model built for every ``model_type`` in ``MODEL_TYPES``."""
