"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE), computed densely for exactness.

Routing as transformers: ``probs = softmax(x @ router.T)`` in float32, the
``top_k`` largest kept (renormalised to sum 1 when ``norm_topk_prob``; Mixtral
always), all other experts weigh 0. Every expert runs on every token and its
output is multiplied by that routing weight, which is exact (a weight of 0
contributes 0) and simple; it costs ``E / top_k`` times the routed compute,
fine for calibration-sized batches. Qwen2-MoE adds a shared SwiGLU expert
scaled by ``sigmoid(x @ shared_expert_gate.T)``.

Parameters mirror the per-expert names checkpoints are saved with
(transformers v5 fuses experts in memory but writes them per expert)::

    {moe}.gate                         router,  kernel [D, E]
    {moe}.experts.{e}.{gate}/{up}      kernel [D, F]     (mixtral: w1 / w3; qwen: gate_proj / up_proj)
    {moe}.experts.{e}.{down}           kernel [F, D]     (mixtral: w2;      qwen: down_proj)
    {moe}.shared_expert.{gate,up,down}_proj, {moe}.shared_expert_gate   (qwen2_moe)

with ``{moe}`` = ``block_sparse_moe`` (mixtral) or ``mlp`` (qwen).

Captures (``capture=True``), shapes for a ``[B, S, D]`` input:

* ``{moe}.experts``: ``[B, S, D]``, the input of every expert's gate and up
  projection (one array, not one copy per expert);
* ``{moe}.experts.{e}.{down}``: ``[B, S, F]``, the input of expert ``e``'s down
  projection, computed for every token (the model only uses routed tokens);
* ``{moe}.routing_weights``: ``[B, S, E]`` float32, zero outside each token's top-k;
* ``{moe}.gate``: ``[B, S, D]``, the router input; qwen2_moe also
  ``{moe}.shared_expert_gate`` and the shared expert's linear inputs under their names.

:func:`linear_input` turns these into ``(input, token_weights)`` for any
linear layer name; :func:`expert_input_groups` declares the same as input
groups (`sgtv_jax.models.groups.InputGroup`) for the calibrated merge. The
router and the shared-expert gate are gates, not trimmed layers (merged
data-free): the model's ``linear_names`` leave them out.

Calibration Hessians of a routed expert weight each token by its routing
weight ``r`` as a token weight of ``sgtv_jax.hessian.hessian_update``, which
weights ``x x^T`` by ``r^2``:  ``H_e = (2/N) sum_t r_{t,e}^2 x_t x_t^T`` over the
real tokens (``N`` sequences, as for every layer; tokens routed elsewhere have
``r = 0``). ``r^2``, not ``r`` or 0/1, because the block adds
``r_{t,e} * expert_e(x_t)``: whatever a trimmed weight ``dW`` of expert e
changes in the expert's output on token t reaches the block's output
multiplied by ``r_{t,e}``. For the down projection the block's squared output
error is exactly ``sum_t r_{t,e}^2 |dW x_t|^2 = (N/2) tr(dW H_e dW^T)``, the
quadratic form OBS minimises; gate / up get the same factor on top of the
layer-wise objective every other layer uses. An unweighted routed-token H
would spend the pruning budget on tokens the router barely sends through the
expert; ``r`` alone matches no output error. The pipeline's fallback for
experts given too few tokens is in `sgtv_jax.pipeline.streams`.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .common import Linear, activation
from .groups import InputGroup

# (gate, up, down) projection names of one expert.
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen": ("gate_proj", "up_proj", "down_proj")}
MOE_PREFIX = {"mixtral": "block_sparse_moe", "qwen": "mlp"}


class Expert(nnx.Module):
    """One SwiGLU expert whose three projections carry the checkpoint's names."""

    def __init__(self, d: int, f: int, names: tuple[str, str, str], *, param_dtype: Any, rngs: nnx.Rngs):
        self.names = names
        for n, (i, o) in zip(names, ((d, f), (d, f), (f, d))):
            setattr(self, n, Linear(i, o, use_bias=False, param_dtype=param_dtype, rngs=rngs))

    def hidden(self, x: jax.Array, act: str) -> jax.Array:
        """Down-projection input ``act(gate(x)) * up(x)``: ``[..., D] -> [..., F]``."""
        g, u, _ = self.names
        return activation(act)(getattr(self, g)(x)) * getattr(self, u)(x)

    def down(self, h: jax.Array) -> jax.Array:
        return getattr(self, self.names[2])(h)


class SparseMoE(nnx.Module):
    """Top-k routed experts (+ optional gated shared expert). ``[B, S, D] -> [B, S, D]``."""

    def __init__(
        self,
        kind: str,
        d: int,
        f: int,
        num_experts: int,
        top_k: int,
        *,
        norm_topk_prob: bool,
        act: str,
        shared_intermediate: int = 0,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kind not in EXPERT_NAMES:
            raise ValueError(f"unknown MoE kind {kind!r}; expected one of {sorted(EXPERT_NAMES)}")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in [1, num_experts={num_experts}]")
        activation(act)  # validate early
        self.kind, self.prefix = kind, MOE_PREFIX[kind]
        self.num_experts, self.top_k, self.norm_topk_prob, self.act = num_experts, top_k, norm_topk_prob, act
        self.gate = Linear(d, num_experts, use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.experts = nnx.List(
            [Expert(d, f, EXPERT_NAMES[kind], param_dtype=param_dtype, rngs=rngs) for _ in range(num_experts)]
        )
        if shared_intermediate:
            names = EXPERT_NAMES["qwen"]
            self.shared_expert: Expert | None = Expert(
                d, shared_intermediate, names, param_dtype=param_dtype, rngs=rngs
            )
            self.shared_expert_gate: Linear | None = Linear(d, 1, use_bias=False, param_dtype=param_dtype, rngs=rngs)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None

    def routing_weights(self, x: jax.Array) -> jax.Array:
        """``[B, S, D] -> [B, S, E]`` float32: top-k softmax probabilities, 0 elsewhere."""
        probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)
        vals, idx = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            vals = vals / jnp.sum(vals, axis=-1, keepdims=True)
        return jnp.sum(jax.nn.one_hot(idx, self.num_experts, dtype=jnp.float32) * vals[..., None], axis=-2)

    def __call__(self, x: jax.Array, caps: dict | None) -> jax.Array:
        p = self.prefix
        w = self.routing_weights(x)
        if caps is not None:
            caps[f"{p}.gate"] = x
            caps[f"{p}.experts"] = x
            caps[f"{p}.routing_weights"] = w
        out = jnp.zeros_like(x)
        for e, expert in enumerate(self.experts):
            h = expert.hidden(x, self.act)
            if caps is not None:
                caps[f"{p}.experts.{e}.{expert.names[2]}"] = h
            # Same order as transformers: down-project, then scale by the routing weight.
            out = out + (expert.down(h) * w[..., e : e + 1].astype(h.dtype)).astype(x.dtype)
        if self.shared_expert is not None and self.shared_expert_gate is not None:  # set together
            if caps is not None:
                for n in ("gate_proj", "up_proj"):
                    caps[f"{p}.shared_expert.{n}"] = x
                caps[f"{p}.shared_expert_gate"] = x
            h = self.shared_expert.hidden(x, self.act)
            if caps is not None:
                caps[f"{p}.shared_expert.down_proj"] = h
            out = out + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert.down(h)
        return out


_EXPERT_RE = re.compile(r"^(?P<p>.+)\.experts\.(?P<e>\d+)\.(?P<n>\w+)$")


def linear_input(caps: dict[str, jax.Array], name: str) -> tuple[jax.Array, jax.Array | None]:
    """Input of linear layer ``name`` (HF-local) and its per-token weights ``[B, S]`` (None: all tokens).

    Routed experts get their routing weights (0 for tokens not routed to
    them); every other layer gets ``(caps[name], None)``.
    """
    m = _EXPERT_RE.match(name)
    if m is None or f"{m['p']}.routing_weights" not in caps:
        return caps[name], None
    p, e, n = m["p"], int(m["e"]), m["n"]
    weights = caps[f"{p}.routing_weights"][..., e]
    if n in ("w2", "down_proj"):
        return caps[name], weights
    return caps[f"{p}.experts"], weights


def expert_input_groups(kind: str, num_experts: int, *, shared: bool) -> tuple[InputGroup, ...]:
    """Input groups of a MoE MLP (HF-local names): per routed expert, gate + up on the shared
    input and down on its own, both weighted by the expert's routing weights; the shared expert
    (``shared``) as a dense MLP. In execution order."""
    p = MOE_PREFIX[kind]
    g, u, d = EXPERT_NAMES[kind]
    groups = []
    for e in range(num_experts):
        weights = f"{p}.routing_weights"
        groups.append(
            InputGroup(
                (f"{p}.experts.{e}.{g}", f"{p}.experts.{e}.{u}"), key=f"{p}.experts", weights_key=weights, column=e
            )
        )
        groups.append(InputGroup((f"{p}.experts.{e}.{d}",), weights_key=weights, column=e))
    if shared:
        groups.append(InputGroup((f"{p}.shared_expert.gate_proj", f"{p}.shared_expert.up_proj")))
        groups.append(InputGroup((f"{p}.shared_expert.down_proj",)))
    return tuple(groups)
