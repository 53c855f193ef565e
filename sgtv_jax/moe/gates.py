"""Router initialisation for `sgtv moe`: mergekit-moe's gate modes and our `calibrated` one.

Every function returns gate vectors ``[L, E, D]`` (layer, expert, hidden):
row ``e`` of layer ``l`` is the router weight row of expert ``e`` (logit =
``row . x`` for a router input ``x``). mergekit-moe's rules
(`mergekit/moe/router.py`), reproduced:

* ``hidden`` / ``hidden_last``: per prompt ``"<bos>" + prompt`` (the
  tokenizer's BOS text if it has one, no other special tokens), the hidden
  state of its last token at the *input* of each decoder block (HF's
  ``hidden_states[:-1]``), averaged over the prompts; the negative prompts'
  average is subtracted; each layer's vector is scaled to unit L2 norm
  (``/ max(norm, 1e-8)``). ``hidden_avg``: the same with every real token's
  average instead of the last token (mergekit also averages its left-padding
  positions in; we do not).
* ``cheap_embed``: the summed token embeddings of all prompts' real tokens,
  unit-normalised, positive minus negative, unit-normalised again; the same
  for every layer.
* ``random``: standard normal; ``uniform_random``: U(-1/sqrt(D), 1/sqrt(D)),
  both from NumPy's generator seeded with the config's ``seed``.

Ours, ``calibrated`` (`calibrated_gates`): layer by layer through the MoE
being built, the router's real input (the post-attention-norm state, not the
block input mergekit reads) of every token of each expert's texts; layer
``l``'s gates are set before layer ``l + 1``'s inputs are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from sgtv_jax.models.common import apply_block, split_block


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[np.ndarray]:
    """mergekit-moe's prompt tokenisation: BOS text + prompt, no special tokens; int32 ``[n_i]`` each."""
    bos = tokenizer.bos_token or ""
    return [np.asarray(tokenizer(bos + p, add_special_tokens=False)["input_ids"], np.int32) for p in prompts]


def _pad(seqs: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids ``[B, S]`` and mask ``[B, S]`` (causal attention: real tokens see no padding)."""
    s = max(len(q) for q in seqs)
    ids = np.full((len(seqs), s), pad_id, np.int32)
    mask = np.zeros((len(seqs), s), np.int32)
    for b, q in enumerate(seqs):
        ids[b, : len(q)], mask[b, : len(q)] = q, 1
    return ids, mask


def block_inputs(model: Any, seqs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Hidden state entering each decoder block: ``L`` arrays ``[B, S, D]`` float64, and the mask ``[B, S]``."""
    ids, mask = _pad(seqs)
    kw = model.block_kwargs(jnp.asarray(mask), ids.shape[1], batch=ids.shape[0])
    x = model.embed(jnp.asarray(ids))
    out = []
    for i in range(len(model.blocks)):
        out.append(np.asarray(x, np.float64))
        graphdef, state = split_block(model, i)
        x = apply_block(graphdef, state, x, capture=False, **kw)
    return out, mask


def _unit(v: np.ndarray) -> np.ndarray:
    """``v / max(||v||, 1e-8)`` over the last axis (mergekit's clamp)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def prompt_states(model: Any, seqs: Sequence[np.ndarray], average: bool) -> np.ndarray:
    """``[L, D]`` float64: per layer, the mean over prompts of the last (or mean real) token's block input."""
    states, mask = block_inputs(model, seqs)
    last = mask.sum(axis=1) - 1
    per = []
    for h in states:
        if average:
            per.append((h * mask[..., None]).sum(axis=1) / mask.sum(axis=1)[:, None])
        else:
            per.append(h[np.arange(len(seqs)), last])
    return np.stack(per).mean(axis=1)


def hidden_gates(model: Any, tokenizer: Any, experts: Sequence[Any], mode: str) -> np.ndarray:
    """mergekit-moe's ``hidden`` rule on the dense base ``model``: ``[L, E, D]`` float64."""
    average = mode == "hidden_avg"
    vecs = []
    for e in experts:
        v = prompt_states(model, tokenize_prompts(tokenizer, e.positive_prompts), average)
        if e.negative_prompts:
            v = v - prompt_states(model, tokenize_prompts(tokenizer, e.negative_prompts), average)
        vecs.append(_unit(v))
    return np.stack(vecs, axis=1)


def cheap_embed_gates(embed: np.ndarray, tokenizer: Any, experts: Sequence[Any], num_layers: int) -> np.ndarray:
    """mergekit-moe's ``cheap_embed`` rule from the token embedding ``[V, D]``: ``[L, E, D]`` float64."""
    table = np.asarray(embed, np.float64)

    def summed(prompts: Sequence[str]) -> np.ndarray:
        ids = np.concatenate(tokenize_prompts(tokenizer, prompts))
        return _unit(table[ids].sum(axis=0))

    vecs = []
    for e in experts:
        v = summed(e.positive_prompts)
        if e.negative_prompts:
            v = v - summed(e.negative_prompts)
        vecs.append(_unit(v))
    return np.broadcast_to(np.stack(vecs)[None], (num_layers, len(vecs), table.shape[1])).copy()


def random_gates(num_layers: int, num_experts: int, hidden: int, seed: int, uniform: bool) -> np.ndarray:
    """``random`` (standard normal) or ``uniform_random`` (torch Linear's init range) gates ``[L, E, D]``."""
    rng = np.random.default_rng(seed)
    shape = (num_layers, num_experts, hidden)
    if uniform:
        scale = np.sqrt(1.0 / hidden)
        return rng.uniform(-scale, scale, shape)
    return rng.standard_normal(shape)


def fit_rows(feats: Sequence[np.ndarray], fit: str, negatives: Sequence[np.ndarray | None]) -> np.ndarray:
    """Router rows ``[E, D]`` from each expert's router inputs ``feats[e]`` ``[n_e, D]`` (float64).

    ``mean``: row e = unit(m_e - c), m_e the mean of expert e's inputs and c the
    mean of its negative texts' inputs if given, else the mean of all m_k (the
    component every text shares would otherwise dominate every logit).
    ``lstsq``: ridge least squares ``min sum_e (1/n_e) sum_t ||W x_t - y_e||^2``
    with ``y_e = onehot(e) - 1/E`` (each expert's texts weigh the same whatever
    their length), ridge 1e-3 * mean diag of the normal matrix.
    """
    means = np.stack([f.mean(axis=0) for f in feats])
    if fit == "mean":
        centre = means.mean(axis=0)
        rows = [m - (centre if n is None else n.mean(axis=0)) for m, n in zip(means, negatives)]
        return _unit(np.stack(rows))
    e_count, d = len(feats), means.shape[1]
    gram, rhs = np.zeros((d, d)), np.zeros((d, e_count))
    for e, f in enumerate(feats):
        target = np.full(e_count, -1.0 / e_count)
        target[e] += 1.0
        gram += f.T @ f / len(f)
        rhs += np.outer(f.sum(axis=0) / len(f), target)
    gram += 1e-3 * np.mean(np.diag(gram)) * np.eye(d)
    return np.linalg.solve(gram, rhs).T
