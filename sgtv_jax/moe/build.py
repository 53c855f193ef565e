"""`sgtv moe CONFIG OUT`: a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint from dense fine-tunes of one base.

Attention, norms, embeddings and head come from ``base_model``; expert ``e``
of layer ``l`` is ``experts[e].source_model``'s MLP of layer ``l`` (plus
``noise_scale`` Gaussian noise, ``down_proj`` times ``residual_scale``, as
mergekit-moe); the Qwen2-MoE shared expert is ``shared_experts[0]``'s MLP.
Routers come from `sgtv_jax.moe.gates`. The output config is built as
mergekit-moe builds it (the base's config re-read as the MoE class, expert
size = the dense intermediate size, top-k renormalised).

Expert tensor layout (``expert_layout``):

* ``per_expert`` (default): ``...experts.{e}.{w1,w2,w3 | gate_proj,up_proj,down_proj}.weight``
  and the router under ``block_sparse_moe.gate`` (Mixtral) / ``mlp.gate`` (Qwen),
  what transformers 5 ``save_pretrained`` writes and every older reader loads;
* ``fused``: transformers 5's in-memory (and mergekit 0.1.5's) layout
  (`convert.expert_layout`).

Checks run before any tensor is read: the config (`sgtv_jax.moe.config`),
the output path (`convert.atomic.prepare_output`) and every MLP tensor's
presence and shape in every expert's headers.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import transformers

from convert.atomic import prepare_output
from convert.conversion import source_dtype
from convert.expert_layout import EXPERT_LAYOUTS, fuse_lazy
from convert.export import export_hf
from convert.readers import open_checkpoint
from sgtv_jax.moe.config import MoeConfig, resolve_architecture
from sgtv_jax.moe.routers import compute_gates, router_names
from sgtv_jax.pipeline.config import ConfigError

_MLP = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_ARCH_CLASS = {"mixtral": "MixtralForCausalLM", "qwen": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}
Lazy = dict[str, Callable[[], np.ndarray]]


def output_config(base_config: dict[str, Any], arch: str, num_experts: int, top_k: int) -> dict[str, Any]:
    """The MoE config.json (mergekit-moe's `_generate_config`): the base's fields under the MoE class."""
    d = {k: v for k, v in base_config.items() if k not in ("model_type", "architectures", "auto_map")}
    f = int(base_config["intermediate_size"])
    if arch == "mixtral":
        d = transformers.MistralConfig(**d).to_dict()
        d = {k: v for k, v in d.items() if k not in ("model_type", "architectures")}
        cfg: Any = transformers.MixtralConfig(**d)
        cfg.num_local_experts, cfg.sliding_window = num_experts, None
    elif arch == "qwen":
        cfg = transformers.Qwen2MoeConfig(**d)
        cfg.num_experts, cfg.sliding_window, cfg.use_sliding_window = num_experts, None, False
        cfg.shared_expert_intermediate_size, cfg.moe_intermediate_size, cfg.qkv_bias = f, f, True
    else:
        cfg = transformers.Qwen3MoeConfig(**d)
        cfg.num_experts, cfg.moe_intermediate_size, cfg.mlp_only_layers = num_experts, f, []
    cfg.num_experts_per_tok = top_k
    if arch != "mixtral":
        cfg.decoder_sparse_step, cfg.norm_topk_prob = 1, True
    cfg.architectures = [_ARCH_CLASS[arch]]
    out = cfg.to_dict()
    out.pop("transformers_version", None)
    return out


def _check_mlps(cfg: MoeConfig, base: Any, ckpts: dict[str, Any], layers: int) -> None:
    """Every expert has every layer's three MLP weights, shaped as the base's (headers only)."""
    problems = []
    for where, ck in ckpts.items():
        for i in range(layers):
            for p in _MLP:
                n = f"model.layers.{i}.mlp.{p}.weight"
                if n not in ck:
                    problems.append(f"{where}: {ck.path} has no tensor {n}")
                elif n in base and ck.shape(n) != base.shape(n):
                    problems.append(f"{where}: {n} is {ck.shape(n)}, the base's {base.shape(n)}")
    if problems:
        raise ConfigError("\n".join(["the expert models do not fit the base:"] + [f"  - {p}" for p in problems[:20]]))


def _expert_source(ck: Any, spec: Any, name: str, param: str, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    """A reader of one expert tensor, with mergekit-moe's noise / residual scaling (float32)."""
    noise = None if spec.noise_scale is None else rng.standard_normal(ck.shape(name), dtype=np.float32)

    def read() -> np.ndarray:
        t = np.asarray(ck.get(name), np.float32)
        if noise is not None:
            t = t + np.float32(spec.noise_scale) * noise
        if param == "down_proj" and spec.residual_scale is not None:
            t = t * np.float32(spec.residual_scale)
        return t

    return read


def plan_tensors(cfg: MoeConfig, arch: str, base: Any, ckpts: list[Any], shared: Any, layers: int) -> Lazy:
    """Per-expert-layout output tensors except the routers, as lazy readers (HF names)."""
    rng = np.random.default_rng(cfg.seed)
    plan: Lazy = {}
    for n in base.names():
        if ".mlp." not in n:
            plan[n] = functools.partial(base.get, n)
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    for i in range(layers):
        for e, (ck, spec) in enumerate(zip(ckpts, cfg.experts)):
            for p in _MLP:
                out = _MIXTRAL[p] if arch == "mixtral" else p
                src = f"model.layers.{i}.mlp.{p}.weight"
                plan[f"model.layers.{i}.{moe}.experts.{e}.{out}.weight"] = _expert_source(ck, spec, src, p, rng)
        if shared is not None:
            for p in _MLP:
                src = f"model.layers.{i}.mlp.{p}.weight"
                plan[f"model.layers.{i}.mlp.shared_expert.{p}.weight"] = _expert_source(
                    shared, cfg.shared_experts[0], src, p, rng
                )
        if arch == "qwen":  # Qwen2-MoE has q/k/v biases; a base without them gets zeros (as mergekit-moe)
            for p in ("q_proj", "k_proj", "v_proj"):
                n = f"model.layers.{i}.self_attn.{p}"
                if f"{n}.bias" not in plan:
                    rows = base.shape(f"{n}.weight")[0]
                    plan[f"{n}.bias"] = functools.partial(np.zeros, rows, np.float32)
    return plan


def warn_degenerate(gates: np.ndarray, threshold: float = 5.0) -> list[int]:
    """mergekit-moe's warning: layers whose gate rows ``[E, D]`` have condition number > ``threshold``."""
    bad = [i for i, g in enumerate(gates) if len(g) > 1 and np.linalg.cond(np.asarray(g, np.float64)) > threshold]
    if bad:
        print(
            f"warning: layers {', '.join(map(str, bad))} of {len(gates)} have nearly parallel router rows "
            "(condition number > 5): the experts' prompts may be too similar, and some experts will see few tokens",
            file=sys.stderr,
        )
    return bad


def _inputs(cfg: MoeConfig) -> dict[str, str]:
    out = cfg.models()
    for k, e in enumerate(cfg.experts + cfg.shared_experts):
        if e.calibration is not None:
            out[f"calibration file {k}"] = e.calibration
    return out


def run_moe(cfg: MoeConfig, out: str | Path, *, expert_layout: str = "per_expert", overwrite: bool = False) -> dict:
    """Build the MoE described by ``cfg`` and write it atomically to ``out``; returns a short summary."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConfigError(f"--expert-layout {expert_layout!r}: one of {', '.join(EXPERT_LAYOUTS)}")
    arch = resolve_architecture(cfg)
    inputs = _inputs(cfg)
    prepare_output(out, overwrite=overwrite, inputs=inputs)
    base = open_checkpoint(cfg.base_model)
    ckpts = [open_checkpoint(e.source_model) for e in cfg.experts]
    shared = open_checkpoint(cfg.shared_experts[0].source_model) if cfg.shared_experts else None
    try:
        layers = int(base.config["num_hidden_layers"])
        named = {f"experts[{k}].source_model": c for k, c in enumerate(ckpts)}
        if shared is not None:
            named["shared_experts[0].source_model"] = shared
        _check_mlps(cfg, base, named, layers)
        top_k = cfg.experts_per_token
        out_cfg = output_config(dict(base.config), arch, len(cfg.experts), top_k)
        plan = plan_tensors(cfg, arch, base, ckpts, shared, layers)
        routers, shared_gates = compute_gates(cfg, arch, out_cfg, plan, base)
        warn_degenerate(routers if shared_gates is None else np.concatenate([routers, shared_gates], axis=1))
        for i in range(layers):
            name, shared_name = router_names(arch, i)
            plan[name] = functools.partial(np.asarray, routers[i], np.float32)
            if shared_gates is not None:
                plan[shared_name] = functools.partial(np.asarray, shared_gates[i], np.float32)
        if expert_layout == "fused":
            plan = fuse_lazy(plan)
        dtype = cfg.dtype or source_dtype(base)
        export_hf(
            ((n, f()) for n, f in plan.items()),
            out,
            config=out_cfg,
            dtype=dtype,
            copy_files_from=cfg.base_model,
            overwrite=overwrite,
            inputs=inputs,
        )
    finally:
        for c in [base, *ckpts] + ([shared] if shared is not None else []):
            c.close()
    return {"architecture": _ARCH_CLASS[arch], "experts": len(cfg.experts), "gate_mode": cfg.gate_mode}
