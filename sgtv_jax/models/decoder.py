"""What the decoder-only families (LLaMA, Gemma) share: their configs' core fields and the attention projections.

Both read the same HF names (`LINEAR_NAMES`, `INPUT_GROUPS`, `hf_block_prefix`)
and rope settings (`rope_settings`). A family's config subclasses `DecoderConfig` (the fields every decoder has, read
from a transformers config by `DecoderConfig.core_fields`) and adds its own; its
attention subclasses `DecoderAttention` (the q / k / v / o projections, the
optional q / k norms, the captured linear inputs) and adds its rotary
embedding and score rule.

Shapes: ``B`` batch, ``S`` length, ``D`` model width, ``H`` heads, ``K``
key/value heads, ``Dh`` head width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
from flax import nnx

from .common import Linear

# Linear layers of one block, in execution order (HF-local names).
LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# Linear layers that read the same input tensor (one Hessian per group), in execution order.
INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def hf_block_prefix(i: int) -> str:
    """HF tensor-name prefix of decoder block ``i``."""
    return f"model.layers.{i}."


def rope_settings(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a transformers config: v5's ``rope_parameters``, else v4's ``rope_scaling`` + ``rope_theta``."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # v4-style config object
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The static hyper-parameters every decoder family has (hashable); a family's config adds the rest."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    model_types: ClassVar[tuple[str, ...]] = ()  # the transformers model_type values the family reads

    @classmethod
    def core_fields(cls, hf_config: Any) -> dict[str, Any]:
        """These fields from a transformers config (head_dim: its own, else hidden / heads; K: else H).

        Raises ValueError for a model_type not in the family's `model_types`.
        """
        mt = hf_config.model_type
        if mt not in cls.model_types:
            raise ValueError(f"{cls.__name__}.from_hf: model_type {mt!r} not in {cls.model_types}")
        heads = hf_config.num_attention_heads
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")  # read as they are
        return dict(
            model_type=mt,
            **{k: getattr(hf_config, k) for k in sizes},
            num_attention_heads=heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            rms_norm_eps=float(hf_config.rms_norm_eps),
        )


class DecoderAttention(nnx.Module):
    """The q / k / v (or one fused qkv) and o projections of a decoder block, and q / k norms when ``cfg.qk_norm``.

    Kernels ``[D, H*Dh]`` (q), ``[D, K*Dh]`` (k, v), ``[H*Dh, D]`` (o); ``norm``
    builds a ``[Dh]`` norm (the family's RMSNorm).
    """

    def __init__(
        self,
        cfg: Any,  # a DecoderConfig subclass: also param_dtype, qk_norm
        *,
        qkv_bias: bool,
        o_bias: bool,
        norm: Callable[..., nnx.Module],
        fused: bool = False,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        d, h, k, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd = cfg.param_dtype
        self.fused = fused
        if fused:
            self.qkv_proj = Linear(d, (h + 2 * k) * dh, use_bias=qkv_bias, param_dtype=pd, rngs=rngs)
        else:
            self.q_proj = Linear(d, h * dh, use_bias=qkv_bias, param_dtype=pd, rngs=rngs)
            self.k_proj = Linear(d, k * dh, use_bias=qkv_bias, param_dtype=pd, rngs=rngs)
            self.v_proj = Linear(d, k * dh, use_bias=qkv_bias, param_dtype=pd, rngs=rngs)
        self.o_proj = Linear(h * dh, d, use_bias=o_bias, param_dtype=pd, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = norm(dh, eps=cfg.rms_norm_eps, param_dtype=pd)
            self.k_norm = norm(dh, eps=cfg.rms_norm_eps, param_dtype=pd)

    def project(self, x: jax.Array, caps: dict | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x ``[B, S, D]`` (normed) -> q ``[B, S, H, Dh]``, k, v ``[B, S, K, Dh]``; their input goes into ``caps``."""
        cfg = self.cfg
        b, s, _ = x.shape
        h, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if self.fused:
            if caps is not None:
                caps["self_attn.qkv_proj"] = x
            qkv = self.qkv_proj(x)
            q, k, v = qkv[..., : h * dh], qkv[..., h * dh : (h + kv) * dh], qkv[..., (h + kv) * dh :]
        else:
            if caps is not None:
                for n in ("q_proj", "k_proj", "v_proj"):
                    caps[f"self_attn.{n}"] = x
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.reshape(b, s, h, dh), k.reshape(b, s, kv, dh), v.reshape(b, s, kv, dh)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def output(self, o: jax.Array, caps: dict | None) -> jax.Array:
        """Attention output ``[B, S, H, Dh]`` -> ``[B, S, D]`` through o_proj (its input goes into ``caps``)."""
        o = o.reshape(o.shape[0], o.shape[1], -1)
        if caps is not None:
            caps["self_attn.o_proj"] = o
        return self.o_proj(o)
