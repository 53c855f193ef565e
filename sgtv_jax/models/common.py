"""Shared building blocks for the Flax NNX model families.

Everything here is float32-accurate by construction: every contraction passes
``precision=HIGHEST`` because GPU/TPU backends otherwise run f32 matmuls as
TF32/bf16, which breaks logit parity and the OBS Hessians built from captured
layer inputs.

Shapes: ``B`` batch, ``S`` query length, ``T`` key length, ``D`` model width,
``H`` heads, ``K`` key/value heads, ``Dh`` head width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HIGHEST = jax.lax.Precision.HIGHEST

# Additive mask value: finite (not -inf) so a fully masked row (a padding query
# that sees only padding keys) gives a uniform softmax instead of NaN.
MASK_VALUE = -1e30


def default_kernel_init() -> Callable:
    """Small-normal init; real weights are always loaded, this only makes random models usable."""
    return nnx.initializers.normal(stddev=0.02)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with kernel ``[in, out]`` and HIGHEST precision.

    x: ``[..., in]`` -> ``[..., out]``. Computation in ``dtype`` (default: the
    parameter dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = nnx.Param(default_kernel_init()(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or self.kernel[...].dtype
        y = jnp.einsum("...i,io->...o", x.astype(dtype), self.kernel[...].astype(dtype), precision=HIGHEST)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Embed(nnx.Module):
    """Token/position embedding table ``[num, features]``; ``ids [...] -> [..., features]``."""

    def __init__(self, num_embeddings: int, features: int, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(default_kernel_init()(rngs.params(), (num_embeddings, features), param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``x [..., features] -> logits [..., num]``."""
        emb = self.embedding[...]
        return jnp.einsum("...d,vd->...v", x.astype(emb.dtype), emb, precision=HIGHEST)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: statistics in float32, then ``weight * x`` (matches HF's order of casts)."""

    def __init__(self, features: int, *, eps: float, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(dtype)
        return self.scale[...].astype(dtype) * y


class LayerNorm(nnx.Module):
    """Standard LayerNorm with weight and bias, statistics in float32."""

    def __init__(self, features: int, *, eps: float, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """HF activation name -> function (exact erf GELU vs tanh approximation matter for parity)."""
    table: dict[str, Callable[[jax.Array], jax.Array]] = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
        "relu": jax.nn.relu,
        "tanh": jnp.tanh,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]


def attention_mask_bool(
    attention_mask: jax.Array | None, batch: int, seq: int, *, causal: bool, sliding_window: int | None = None
) -> jax.Array:
    """Boolean ``[B, 1, S, S]`` mask, True where a query may attend to a key.

    ``attention_mask``: ``[B, S]`` with 1 for real tokens and 0 for padding (or
    None = no padding). ``causal`` adds ``key <= query``; ``sliding_window``
    adds ``key > query - window`` (HF's sliding-window overlay).
    """
    q = jnp.arange(seq)[:, None]
    k = jnp.arange(seq)[None, :]
    allowed = jnp.ones((seq, seq), dtype=bool)
    if causal:
        allowed = allowed & (k <= q)
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    allowed = jnp.broadcast_to(allowed[None, None], (batch, 1, seq, seq))
    if attention_mask is not None:
        keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        allowed = allowed & keep
    return allowed


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float, softcap: float | None = None
) -> jax.Array:
    """Grouped-query attention.

    q ``[B, S, H, Dh]``, k/v ``[B, T, K, Dh]`` with ``H % K == 0`` (query head
    ``h`` uses kv head ``h // (H//K)``, as HF's ``repeat_kv``), mask
    ``[B, 1, S, T]`` bool. ``softcap``: scores become ``softcap * tanh(s / softcap)``
    before masking (Gemma 2). Softmax in float32. Returns ``[B, S, H, Dh]``.
    """
    b, s, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    qg = q.reshape(b, s, kv, g, dh)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, precision=HIGHEST).astype(jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = jnp.where(mask[:, :, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, precision=HIGHEST)
    return out.reshape(b, s, h, dh)


# ---------------------------------------------------------------------------
# Block-level functional API shared by all families.


class FamilyModel(nnx.Module):
    """Base of each family's top-level model: the interface the blockwise functions below rely on.

    Declared for type checkers only (each family implements it; nothing here runs):
    ``config`` (the family's frozen config, ``config_class``), ``blocks``,
    ``embed`` -> ``blocks`` with ``block_kwargs`` -> ``head``, and the HF names
    ``hf_block_prefix(i)`` and ``linear_names``.
    """

    if TYPE_CHECKING:
        config_class: ClassVar[type[Any]]
        config: Any
        blocks: nnx.List
        embed: Callable[..., jax.Array]  # input_ids [B, S] (+ family extras) -> hidden [B, S, D]
        block_kwargs: Callable[..., dict[str, Any]]  # (attention_mask, seq_len, batch=...) -> block kwargs
        head: Callable[[jax.Array], jax.Array]
        hf_block_prefix: Callable[[int], str]

        def __init__(self, cfg: Any, *, rngs: nnx.Rngs) -> None: ...

        @property
        def linear_names(self) -> tuple[str, ...]: ...


def fixed_input_groups(groups: tuple[tuple[str, ...], ...]) -> Callable[[Any], tuple[tuple[str, ...], ...]]:
    """A family's ``input_groups(cfg)`` when its groups do not depend on the config."""

    def input_groups(cfg: Any) -> tuple[tuple[str, ...], ...]:
        """Linear layers of a block sharing one input (the same for every config of this family)."""
        return groups

    return input_groups


def lm_head_unless_tied(cfg: Any, hidden: int, vocab: int, rngs: nnx.Rngs) -> Linear | None:
    """The untied LM head ``[D -> V]`` (no bias, ``cfg.param_dtype``); None when ``cfg.tie_word_embeddings``."""
    if cfg.tie_word_embeddings:
        return None
    return Linear(hidden, vocab, use_bias=False, param_dtype=cfg.param_dtype, rngs=rngs)


def tied_logits(x: jax.Array, embed: Embed, lm_head: Linear | None) -> jax.Array:
    """``[B, S, D] -> [B, S, V]``: the LM head, or the embedding table transposed when tied (no head)."""
    return embed.attend(x) if lm_head is None else lm_head(x)


def block_batch(attention_mask: jax.Array | None, batch: int | None) -> int:
    """The batch size of ``block_kwargs``: `batch`, else the rows of `attention_mask` ``[B, S]``."""
    if batch is None:
        if attention_mask is None:
            raise ValueError("pass batch when attention_mask is None")
        batch = attention_mask.shape[0]
    return batch


def default_positions(positions: jax.Array | None, batch: int, seq_len: int) -> jax.Array:
    """`positions`, else ``arange(S)`` for every row ``[B, S]`` int32 (transformers' default without position_ids)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32)[None], (batch, seq_len))
    return positions


def forward(
    model: FamilyModel, input_ids: jax.Array, attention_mask: jax.Array | None, *embed_args: Any, **block_extra: Any
) -> jax.Array:
    """A family model's ``__call__``: ``embed(input_ids, *embed_args)`` -> every block -> ``head``; ``[B, S]`` ids in."""
    b, s = input_ids.shape
    kw = model.block_kwargs(attention_mask, s, batch=b, **block_extra)
    x = model.embed(input_ids, *embed_args)
    for blk in model.blocks:
        x = blk(x, **kw)
    return model.head(x)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("capture",))
def apply_block(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, *, capture: bool = False, **kwargs: Any):
    """Run one block given as ``nnx.split`` pieces: ``(graphdef, state, x, **block_kwargs)``.

    All blocks of a model have the same graphdef and state shapes, so this
    compiles once per model (per input shape) and is reused for every block.
    Returns ``y [B, S, D]`` or ``(y, captures)`` when ``capture``.
    """
    block = nnx.merge(graphdef, state)
    return block(x, capture=capture, **kwargs)


def forward_blockwise(
    model: FamilyModel, input_ids: jax.Array, attention_mask: jax.Array | None = None, **embed_kwargs: Any
) -> jax.Array:
    """Full forward through ``apply_block`` (one compiled block program reused for every block).

    Same result as ``model(input_ids, attention_mask)``; ``[B, S] -> [B, S, V]``
    (BERT: ``[B, S, D]``). Much cheaper to compile than tracing a deep model whole.
    """
    b, s = input_ids.shape
    kw = model.block_kwargs(attention_mask, s, batch=b)
    x = model.embed(input_ids, **embed_kwargs)
    for i in range(len(model.blocks)):
        graphdef, state = split_block(model, i)
        x = apply_block(graphdef, state, x, capture=False, **kw)
    return model.head(x)


def split_block(model: FamilyModel, i: int) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split`` of block ``i`` (graphdef is identical across blocks)."""
    return nnx.split(model.blocks[i])


def get_block_state(model: FamilyModel, i: int) -> nnx.State:
    """Parameters of block ``i`` as an ``nnx.State`` (paths relative to the block)."""
    return nnx.state(model.blocks[i])


def set_block_state(model: FamilyModel, i: int, state: nnx.State) -> None:
    """Install ``state`` (e.g. merged weights) into block ``i`` in place."""
    nnx.update(model.blocks[i], state)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def _rope_dim(head_dim: int, params: dict[str, Any]) -> int:
    """Rotated width: ``int(head_dim * partial_rotary_factor)`` (even), as transformers computes it."""
    dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0) or 1.0))
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise ValueError(
            f"partial_rotary_factor {params.get('partial_rotary_factor')!r} gives a rotary width "
            f"of {dim} for head_dim {head_dim}; it must be even and in (0, head_dim]"
        )
    return dim


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    exps = (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)).astype(np.float32)
    return (np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)).astype(np.float32)


def rope_inv_freq(
    head_dim: int, rope_parameters: dict[str, Any], max_position_embeddings: int | None = None
) -> tuple[tuple[float, ...], float]:
    """Inverse frequencies ``[rotary_dim/2]`` and attention scaling (cos/sin factor) for split-half RoPE.

    Mirrors transformers' ``default``, ``linear``, ``llama3``, ``yarn`` and
    ``longrope`` (short factors; see :func:`rope_long_inv_freq`) rope types in
    float32 like torch; ``partial_rotary_factor < 1`` rotates only the first
    ``rotary_dim`` channels of each head. ``dynamic`` NTK scaling changes the
    frequencies with the sequence length and the model's call history, so it
    is refused by name. Returned as a tuple so configs stay hashable.
    """
    params = dict(rope_parameters or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    base = float(params["rope_theta"])
    dim = _rope_dim(head_dim, params)
    inv = _base_inv_freq(base, dim)
    scaling = 1.0
    if rope_type == "linear":
        inv = (inv / np.float32(params["factor"])).astype(np.float32)
    elif rope_type == "llama3":
        factor = float(params["factor"])
        low = float(params["low_freq_factor"])
        high = float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        low_wl = old / low
        high_wl = old / high
        wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wl, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope_type == "yarn":
        inv, scaling = _yarn(base, dim, params, max_position_embeddings)
    elif rope_type == "longrope":
        inv, scaling = _longrope(base, dim, params, max_position_embeddings, long=False)
    return tuple(float(v) for v in inv), float(scaling)


def rope_long_inv_freq(
    head_dim: int, rope_parameters: dict[str, Any], max_position_embeddings: int | None = None
) -> tuple[tuple[float, ...], int] | None:
    """LongRoPE's long-context frequencies and the length above which they apply, else None.

    transformers switches from the short to the long factors when
    ``max(position_ids) + 1 > original_max_position_embeddings`` (one choice
    for the whole batch); :func:`apply_rope` does the same.
    """
    params = dict(rope_parameters or {})
    if params.get("rope_type", params.get("type")) != "longrope":
        return None
    inv, _ = _longrope(
        float(params["rope_theta"]), _rope_dim(head_dim, params), params, max_position_embeddings, long=True
    )
    return tuple(float(v) for v in inv), int(params["original_max_position_embeddings"])


def _rope_factor(params: dict[str, Any], orig: Any, max_pos: int | None, what: str) -> Any:
    """The scaling ``factor``, else ``max_position_embeddings / original_max_position_embeddings``."""
    factor = params.get("factor")
    if factor is None:
        if max_pos is None:
            raise ValueError(f"{what} without 'factor' needs max_position_embeddings")
        factor = max_pos / orig
    return factor


def _yarn(base: float, dim: int, params: dict[str, Any], max_pos: int | None) -> tuple[np.ndarray, float]:
    """YaRN: blend of interpolated and extrapolated frequencies by a linear ramp over dimensions."""
    orig = params["original_max_position_embeddings"]
    factor = float(_rope_factor(params, orig, max_pos, "yarn rope"))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1).astype(
        np.float32
    )
    extrapolation = (np.float32(1) - ramp).astype(np.float32)
    pos_freqs = np.power(
        np.float32(base), (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)), dtype=np.float32
    )
    inv_extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
    inv_inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv = (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)
    return inv, float(attention)


def _longrope(
    base: float, dim: int, params: dict[str, Any], max_pos: int | None, *, long: bool
) -> tuple[np.ndarray, float]:
    """LongRoPE (Phi-3 "su"): per-dimension rescaling factors, short or long set."""
    orig = params["original_max_position_embeddings"]
    factor = _rope_factor(params, orig, max_pos, "longrope")
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = np.asarray(params["long_factor" if long else "short_factor"], dtype=np.float32)
    if ext.shape != (dim // 2,):
        raise ValueError(
            f"longrope {'long' if long else 'short'}_factor has {ext.size} entries; "
            f"the rotary width {dim} needs {dim // 2}"
        )
    shape = (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)).astype(np.float32)
    inv = (np.float32(1.0) / (ext * np.power(np.float32(base), shape, dtype=np.float32))).astype(np.float32)
    return inv, float(attention)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    inv_freq: tuple[float, ...],
    scaling: float,
    long: tuple[tuple[float, ...], int] | None = None,
) -> jax.Array:
    """Split-half (``rotate_half``) RoPE on the first ``2*len(inv_freq)`` channels of each head.

    x ``[B, S, H, Dh]``, positions ``[B, S]`` int. ``long``: LongRoPE's
    ``(long_inv_freq, threshold)``, used instead of ``inv_freq`` when
    ``max(positions) + 1 > threshold``.
    """
    inv = jnp.asarray(inv_freq, dtype=jnp.float32)
    if long is not None:
        use_long = jnp.max(positions) + 1 > long[1]
        inv = jnp.where(use_long, jnp.asarray(long[0], dtype=jnp.float32), inv)
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, S, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = (jnp.cos(emb) * scaling).astype(x.dtype)[:, :, None, :]
    sin = (jnp.sin(emb) * scaling).astype(x.dtype)[:, :, None, :]
    rd = 2 * len(inv_freq)
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * cos + rot * sin
    return out if rd == x.shape[-1] else jnp.concatenate([out, xp], axis=-1)
