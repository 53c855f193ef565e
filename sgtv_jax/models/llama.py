"""LLaMA-family decoder in Flax NNX: llama, mistral, qwen2 (q/k/v biases), qwen3, phi3, SmolLM.

RMSNorm, split-half RoPE (from transformers v5 ``config.rope_parameters``,
including llama3 / linear / yarn / longrope scaling and partial rotary
factors), grouped-query attention, SwiGLU MLP, tied or untied LM head,
optional sliding-window attention (mistral, phi3). Variants are config flags:

* ``qk_norm`` (qwen3): RMSNorm over each head's query / key (``self_attn.q_norm``,
  ``self_attn.k_norm``, weight ``[Dh]``) before RoPE.
* ``fused`` (phi3): one ``self_attn.qkv_proj`` (rows: q, then k, then v) and one
  ``mlp.gate_up_proj`` (rows: gate, then up); these are the capture keys too.
* ``moe`` (mixtral, qwen2_moe, qwen3_moe): the MLP is a ``sgtv_jax.models.moe.SparseMoE``
  (``block_sparse_moe`` for mixtral, ``mlp`` for qwen); see that module for
  its parameters and capture format.

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
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from .common import (
    Embed,
    FamilyModel,
    Linear,
    RMSNorm,
    activation,
    apply_rope,
    attention_mask_bool,
    block_batch,
    default_positions,
    dot_product_attention,
    forward,
    lm_head_unless_tied,
    rope_inv_freq,
    rope_long_inv_freq,
    tied_logits,
)
from .decoder import INPUT_GROUPS, LINEAR_NAMES, DecoderAttention, DecoderConfig, hf_block_prefix, rope_settings
from .groups import InputGroup
from .moe import EXPERT_NAMES, MOE_PREFIX, SparseMoE, expert_input_groups

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")

# phi3's fused projections (the unfused names and groups: `decoder.LINEAR_NAMES`, `decoder.INPUT_GROUPS`)
FUSED_LINEAR_NAMES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
FUSED_INPUT_GROUPS = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))


def input_groups(cfg: LlamaConfig) -> tuple[tuple[str, ...] | InputGroup, ...]:
    """Linear layers of a block sharing one input, for this config (one Hessian per group).

    MoE blocks: attention as dense blocks; each routed expert's gate / up
    projections read the experts' shared input and its down projection its own,
    both weighted by the expert's routing weights (``sgtv_jax.models.moe``:
    capture format); a shared expert (qwen2_moe) as a dense MLP. The router and
    the shared-expert gate are not linear layers here (merged data-free).
    """
    if cfg.moe is None:
        return FUSED_INPUT_GROUPS if cfg.fused else INPUT_GROUPS
    return INPUT_GROUPS[:2] + expert_input_groups(
        cfg.moe, cfg.num_experts, shared=bool(cfg.shared_expert_intermediate_size)
    )


def linear_names(cfg: LlamaConfig) -> tuple[str, ...]:
    """HF-local names of one block's linear layers (MoE: routed and shared experts, not the gates)."""
    if cfg.fused:
        return FUSED_LINEAR_NAMES
    if cfg.moe is None:
        return LINEAR_NAMES
    p = MOE_PREFIX[cfg.moe]
    names = list(LINEAR_NAMES[:4])
    for e in range(cfg.num_experts):
        names += [f"{p}.experts.{e}.{n}" for n in EXPERT_NAMES[cfg.moe]]
    if cfg.shared_expert_intermediate_size:
        names += [f"{p}.shared_expert.{n}" for n in EXPERT_NAMES["qwen"]]
    return tuple(names)


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """rope settings from a v5 config (``rope_parameters``), falling back to v4 fields."""
    params = dict(rope_settings(hf_config))
    if "rope_theta" not in params:
        raise ValueError("config.rope_parameters has no 'rope_theta'")
    return params


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """Static hyper-parameters of a LLaMA-family model (hashable): `DecoderConfig`'s, then these."""

    rope_inv_freq: tuple[float, ...]
    rope_attention_scaling: float = 1.0
    rope_long: tuple[tuple[float, ...], int] | None = None  # LongRoPE (long_inv_freq, threshold)
    qk_norm: bool = False
    fused: bool = False
    moe: str | None = None  # "mixtral" | "qwen" (sgtv_jax.models.moe)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    rope_parameters: tuple[tuple[str, Any], ...] = ()
    param_dtype: Any = jnp.float32
    model_types: ClassVar[tuple[str, ...]] = MODEL_TYPES

    @classmethod
    def from_hf(cls, hf_config: Any, param_dtype: Any = jnp.float32) -> LlamaConfig:
        """Build from a transformers Llama/Mistral/Qwen2/Qwen3/Phi3 config."""
        core = cls.core_fields(hf_config)
        mt, head_dim = core["model_type"], core["head_dim"]
        rope = _rope_parameters(hf_config)
        if "original_max_position_embeddings" not in rope and hasattr(hf_config, "original_max_position_embeddings"):
            rope["original_max_position_embeddings"] = hf_config.original_max_position_embeddings
        if mt != "phi3" and float(rope.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            # transformers rotates the whole head for these types (and fails on a partial table).
            raise ValueError(f"{mt}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
        max_pos = getattr(hf_config, "max_position_embeddings", None)
        inv, scaling = rope_inv_freq(head_dim, rope, max_pos)
        long = rope_long_inv_freq(head_dim, rope, max_pos)
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        qkv_bias = {"qwen2": True, "qwen2_moe": bool(getattr(hf_config, "qkv_bias", True))}.get(mt, attention_bias)
        window = None
        if mt in ("mistral", "phi3", "mixtral"):
            window = getattr(hf_config, "sliding_window", None)
        elif mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
            types = getattr(hf_config, "layer_types", None) or []
            if any(t != "full_attention" for t in types):
                # Per-layer windows would give blocks different masks; released Qwen2/3 do not use them.
                raise ValueError(f"{mt} with use_sliding_window=True (layer_types {types}) is not supported")
        act = getattr(hf_config, "hidden_act", "silu")
        moe = _moe_fields(hf_config)
        return cls(
            **core,
            rope_inv_freq=inv,
            rope_attention_scaling=scaling,
            rope_long=long,
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            fused=mt == "phi3",
            **moe,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias and mt not in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            hidden_act=act,
            sliding_window=window,
            rope_parameters=tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (dict, list)))),
            param_dtype=param_dtype,
        )


def _moe_fields(hf_config: Any) -> dict[str, Any]:
    """MoE fields of ``LlamaConfig`` for mixtral / qwen2_moe / qwen3_moe (empty for dense types)."""
    mt = hf_config.model_type
    if mt == "mixtral":
        return dict(
            moe="mixtral",
            num_experts=hf_config.num_local_experts,
            num_experts_per_tok=hf_config.num_experts_per_tok,
            norm_topk_prob=True,
            moe_intermediate_size=hf_config.intermediate_size,
        )
    if mt not in ("qwen2_moe", "qwen3_moe"):
        return {}
    step = getattr(hf_config, "decoder_sparse_step", 1)
    dense = list(getattr(hf_config, "mlp_only_layers", None) or [])
    if hf_config.num_experts <= 0 or step != 1 or dense:
        # Dense layers among sparse ones would give blocks different parameters.
        raise ValueError(
            f"{mt}: only configs where every layer is sparse are supported "
            f"(num_experts={hf_config.num_experts}, decoder_sparse_step={step}, "
            f"mlp_only_layers={dense})"
        )
    return dict(
        moe="qwen",
        num_experts=hf_config.num_experts,
        num_experts_per_tok=hf_config.num_experts_per_tok,
        norm_topk_prob=bool(hf_config.norm_topk_prob),
        moe_intermediate_size=hf_config.moe_intermediate_size,
        shared_expert_intermediate_size=(hf_config.shared_expert_intermediate_size if mt == "qwen2_moe" else 0),
    )


class LlamaAttention(DecoderAttention):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, norm=RMSNorm, fused=cfg.fused, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, caps: dict | None) -> jax.Array:
        """x ``[B, S, D]`` (already normed) -> ``[B, S, D]``."""
        cfg = self.cfg
        q, k, v = self.project(x, caps)
        q = apply_rope(q, positions, cfg.rope_inv_freq, cfg.rope_attention_scaling, cfg.rope_long)
        k = apply_rope(k, positions, cfg.rope_inv_freq, cfg.rope_attention_scaling, cfg.rope_long)
        o = dot_product_attention(q, k, v, mask, cfg.head_dim**-0.5)
        return self.output(o, caps)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.act_name = cfg.hidden_act
        self.fused = cfg.fused
        if cfg.fused:
            self.gate_up_proj = Linear(d, 2 * f, use_bias=cfg.mlp_bias, param_dtype=pd, rngs=rngs)
        else:
            self.gate_proj = Linear(d, f, use_bias=cfg.mlp_bias, param_dtype=pd, rngs=rngs)
            self.up_proj = Linear(d, f, use_bias=cfg.mlp_bias, param_dtype=pd, rngs=rngs)
        self.down_proj = Linear(f, d, use_bias=cfg.mlp_bias, param_dtype=pd, rngs=rngs)
        activation(cfg.hidden_act)  # validate early

    def __call__(self, x: jax.Array, caps: dict | None) -> jax.Array:
        if self.fused:
            if caps is not None:
                caps["mlp.gate_up_proj"] = x
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            if caps is not None:
                caps["mlp.gate_proj"] = x
                caps["mlp.up_proj"] = x
            gate, up = self.gate_proj(x), self.up_proj(x)
        hdn = activation(self.act_name)(gate) * up
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
        if cfg.moe is None:
            self.mlp = LlamaMLP(cfg, rngs=rngs)
        else:
            ffn = SparseMoE(
                cfg.moe,
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.num_experts_per_tok,
                norm_topk_prob=cfg.norm_topk_prob,
                act=cfg.hidden_act,
                shared_intermediate=cfg.shared_expert_intermediate_size,
                param_dtype=pd,
                rngs=rngs,
            )
            setattr(self, MOE_PREFIX[cfg.moe], ffn)  # block_sparse_moe (mixtral) or mlp (qwen), as HF names it
        self.ffn_name = "mlp" if cfg.moe is None else MOE_PREFIX[cfg.moe]

    def __call__(self, x: jax.Array, *, mask: jax.Array, positions: jax.Array, capture: bool = False):
        """x ``[B, S, D]``, mask ``[B, 1, S, S]`` bool, positions ``[B, S]`` int.

        Returns ``y [B, S, D]``, or ``(y, captures)`` with ``captures[name]`` the
        ``[B, S, in_features]`` input of each linear layer (HF-local names).
        """
        caps: dict | None = {} if capture else None
        x = x + self.self_attn(self.input_layernorm(x), mask, positions, caps)
        x = x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x), caps)
        return (x, caps) if capture else x


class LlamaForCausalLM(FamilyModel):
    """LLaMA-family causal LM. ``__call__(input_ids [B,S], attention_mask [B,S]) -> logits [B,S,V]``."""

    config_class = LlamaConfig

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pd = cfg.param_dtype
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pd, rngs=rngs)
        self.blocks = nnx.List([LlamaBlock(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.lm_head = lm_head_unless_tied(cfg, cfg.hidden_size, cfg.vocab_size, rngs)

    hf_block_prefix = staticmethod(hf_block_prefix)

    @property
    def linear_names(self) -> tuple[str, ...]:
        """HF-local names of each block's linear layers (= capture keys), in execution order."""
        return linear_names(self.config)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids ``[B, S]`` -> hidden ``[B, S, D]``."""
        return self.embed_tokens(input_ids)

    def block_kwargs(
        self,
        attention_mask: jax.Array | None,
        seq_len: int,
        batch: int | None = None,
        positions: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Keyword arguments every block takes: causal (+padding, +window) mask and positions.

        Positions default to ``arange(S)`` for every row, as transformers does
        when no ``position_ids`` are given.
        """
        batch = block_batch(attention_mask, batch)
        mask = attention_mask_bool(
            attention_mask, batch, seq_len, causal=True, sliding_window=self.config.sliding_window
        )
        positions = default_positions(positions, batch, seq_len)
        return {"mask": mask, "positions": positions}

    def head(self, x: jax.Array) -> jax.Array:
        """Final RMSNorm + LM head: ``[B, S, D] -> logits [B, S, V]`` (float32 for f32 params)."""
        return tied_logits(self.norm(x), self.embed_tokens, self.lm_head)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        return forward(self, input_ids, attention_mask, positions=positions)


MODEL_CLASS = LlamaForCausalLM
"""The Flax model built for every ``model_type`` in ``MODEL_TYPES``."""
