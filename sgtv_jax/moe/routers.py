"""Router weights of the MoE being built, per gate mode (rules in `sgtv_jax.moe.gates`).

`compute_gates` returns ``(routers [L, E, D], shared [L, 1, D] or None)``;
the shared row (Qwen2-MoE's ``shared_expert_gate``) is computed like one more
expert, as mergekit-moe does. ``calibrated`` runs the MoE itself, block by
block (`calibrated_gates`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from convert.conversion import load_flax_model
from convert.namemaps import get_name_map
from convert.readers import hf_config_object
from sgtv_jax.models.common import apply_block, split_block
from sgtv_jax.models.registry import build_abstract_model
from sgtv_jax.moe import gates as G
from sgtv_jax.moe.config import ExpertSpec, MoeConfig
from sgtv_jax.pipeline.calibration import load_tokenizer, read_documents
from sgtv_jax.pipeline.config import ConfigError


class _Lazy(Mapping):
    """A read-only mapping over lazy tensor readers (what the name maps' loaders take)."""

    def __init__(self, plan: Mapping[str, Callable[[], np.ndarray]]):
        self._plan = plan

    def __getitem__(self, k: str) -> np.ndarray:
        return self._plan[k]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)


def _texts(spec: ExpertSpec, tokenizer: Any, seqlen: int) -> list[np.ndarray]:
    """Calibration token sequences of one expert: its prompts, and its file cut into ``seqlen`` windows."""
    seqs = G.tokenize_prompts(tokenizer, spec.positive_prompts) if spec.positive_prompts else []
    if spec.calibration is not None:
        for doc in read_documents(spec.calibration):
            ids = np.asarray(tokenizer(doc, add_special_tokens=False)["input_ids"], np.int32)
            seqs.extend(ids[k : k + seqlen] for k in range(0, len(ids), seqlen) if len(ids[k : k + seqlen]) > 0)
    return [s for s in seqs if len(s)]


def _router_inputs(model: Any, i: int, state: dict[str, Any], prefix: str) -> np.ndarray:
    """The router inputs of block ``i`` at every real token of one text set: ``[n, D]`` float64."""
    graphdef, params = split_block(model, i)
    _, caps = apply_block(graphdef, params, state["x"], capture=True, **state["kw"])
    r = np.asarray(caps[f"{prefix}.gate"], np.float64)
    return r[state["mask"].astype(bool)]


def _start(model: Any, seqs: Sequence[np.ndarray]) -> dict[str, Any]:
    ids, mask = G._pad(seqs)
    kw = model.block_kwargs(jnp.asarray(mask), ids.shape[1], batch=ids.shape[0])
    return {"x": model.embed(jnp.asarray(ids)), "mask": mask, "kw": kw}


def calibrated_gates(
    model: Any, sets: list[list[np.ndarray]], negatives: list[list[np.ndarray] | None], shared: list | None, fit: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Set ``model``'s routers layer by layer from each expert's texts through the MoE itself.

    ``sets[e]``: expert e's token sequences; ``negatives[e]``: its negative
    prompts' (or None); ``shared``: the shared expert's (Qwen2-MoE) or None.
    Block ``i``'s router inputs are read with blocks ``< i`` already routed
    by their fitted gates; block ``i``'s rows are `gates.fit_rows`; the shared
    gate row is the unit mean of the shared texts' router inputs (mergekit's
    positive-only rule). Returns ``([L, E, D], [L, 1, D] or None)``.
    """
    prefix = model.blocks[0].ffn_name
    groups = {("e", k): _start(model, s) for k, s in enumerate(sets)}
    groups.update({("n", k): _start(model, s) for k, s in enumerate(negatives) if s})
    if shared:
        groups[("s", 0)] = _start(model, shared)
    rows_out, shared_out = [], []
    for i in range(len(model.blocks)):
        feats = {g: _router_inputs(model, i, st, prefix) for g, st in groups.items()}
        negs = [feats.get(("n", k)) for k in range(len(sets))]
        rows = G.fit_rows([feats[("e", k)] for k in range(len(sets))], fit, negs)
        moe = getattr(model.blocks[i], prefix)
        moe.gate.kernel[...] = jnp.asarray(rows.T, moe.gate.kernel[...].dtype)
        rows_out.append(rows)
        if shared:
            row = G._unit(feats[("s", 0)].mean(axis=0))[None]
            moe.shared_expert_gate.kernel[...] = jnp.asarray(row.T, moe.gate.kernel[...].dtype)
            shared_out.append(row)
        for st in groups.values():  # on to block i + 1, through block i as now routed
            graphdef, params = split_block(model, i)
            st["x"] = apply_block(graphdef, params, st["x"], capture=False, **st["kw"])
    return np.stack(rows_out), (np.stack(shared_out) if shared else None)


def _moe_model(out_cfg: dict[str, Any], plan: Mapping[str, Callable[[], np.ndarray]], arch: str) -> Any:
    """The MoE as a Flax model (float32), its routers zero until `calibrated_gates` sets them."""
    full = dict(plan)
    layers = int(out_cfg["num_hidden_layers"])
    e = int(out_cfg.get("num_local_experts") or out_cfg["num_experts"])
    d = int(out_cfg["hidden_size"])
    for i in range(layers):
        name, shared_name = router_names(arch, i)
        full[name] = functools.partial(np.zeros, (e, d), np.float32)
        if arch == "qwen":
            full[shared_name] = functools.partial(np.zeros, (1, d), np.float32)
    abstract = build_abstract_model(hf_config_object(out_cfg))
    return get_name_map(out_cfg["model_type"]).load_hf_state_dict_into_model(abstract, _Lazy(full))


def router_names(arch: str, i: int) -> tuple[str, str]:
    """HF names of layer ``i``'s router and (Qwen2-MoE) shared-expert gate, per-expert layout."""
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    return f"model.layers.{i}.{moe}.gate.weight", f"model.layers.{i}.mlp.shared_expert_gate.weight"


def _shared_needs(cfg: MoeConfig, arch: str) -> ExpertSpec | None:
    if arch != "qwen":
        return None
    spec = cfg.shared_experts[0]
    if cfg.gate_mode not in ("random", "uniform_random") and not (spec.positive_prompts or spec.calibration):
        raise ConfigError(f"shared_experts[0].positive_prompts: required by gate_mode {cfg.gate_mode} (qwen)")
    return spec


def compute_gates(
    cfg: MoeConfig, arch: str, out_cfg: dict[str, Any], plan: Mapping[str, Callable[[], np.ndarray]], base: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    """Routers ``[L, E, D]`` (+ shared gate ``[L, 1, D]`` for Qwen2-MoE) by ``cfg.gate_mode``."""
    shared = _shared_needs(cfg, arch)
    specs = list(cfg.experts) + ([shared] if shared is not None else [])
    e = len(cfg.experts)
    layers, d = int(out_cfg["num_hidden_layers"]), int(out_cfg["hidden_size"])
    mode = cfg.gate_mode
    if mode == "calibrated":
        tok = load_tokenizer(cfg.base_model)
        sets = [_texts(s, tok, cfg.calibration_seqlen) for s in cfg.experts]
        for k, s in enumerate(sets):
            if not s:
                raise ConfigError(f"experts[{k}]: its calibration texts give no tokens")
        negs = [G.tokenize_prompts(tok, s.negative_prompts) if s.negative_prompts else None for s in cfg.experts]
        sh = _texts(shared, tok, cfg.calibration_seqlen) if shared is not None else None
        return calibrated_gates(_moe_model(out_cfg, plan, arch), sets, negs, sh, cfg.calibration_fit)
    if mode in ("random", "uniform_random"):
        vecs = G.random_gates(layers, len(specs), d, cfg.seed, uniform=mode == "uniform_random")
    elif mode == "cheap_embed":
        vecs = G.cheap_embed_gates(base.get("model.embed_tokens.weight"), load_tokenizer(cfg.base_model), specs, layers)
    else:
        model, _ = load_flax_model(cfg.base_model)
        vecs = G.hidden_gates(model, load_tokenizer(cfg.base_model), specs, mode)
    return vecs[:, :e], (vecs[:, e:] if shared is not None else None)
