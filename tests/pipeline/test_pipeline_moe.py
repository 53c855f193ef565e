"""Calibrated merges of MoE checkpoints: every expert's Hessian against an independent PyTorch hook computation.

For tiny Mixtral, Qwen2-MoE (gated shared expert, routing weights not
renormalised) and Qwen3-MoE, `trim: sparsegpt` merges with the `base`,
`merged` and `per_task` Hessian sources. The reference runs transformers'
own PyTorch model with forward hooks on the router (its logits) and on the
fused experts (their input), derives the top-k routing weights `r` from the
logits itself in float64 and forms the documented Hessians
(`sgtv_jax.models.moe`, `sgtv_jax.pipeline.streams`):

    expert e, gate / up:  (2/N) sum_t r_te^2 x_t x_t^T        over real tokens
    expert e, down:       (2/N) sum_t r_te^2 h_te h_te^T      h_te = silu(Wg_e x_t) * (Wu_e x_t)
    fallback (fewer than moe_min_tokens routed tokens): the same sums with weight 1 on every real token

with N the number of calibration sequences. The `merged` source's reference
model is the merged output with block i put back to the base block i
(block i's Hessians are taken before it is merged).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
import yaml

from sgtv_jax.cli import main
from sgtv_jax.pipeline.calibration import load_calibration, load_tokenizer
from sgtv_jax.pipeline.config import ConfigError, parse_config
from sgtv_jax.pipeline.report import REPORT_FILE
from sgtv_jax.pipeline.sequential import run_merge
from tests.helpers import tiny_models as H

LAYERS = 3
# (checkpoint prefix of the MoE MLP, expert (gate, up, down) names, router names merged data-free)
MOE = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), ("block_sparse_moe.gate",)),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), ("mlp.gate", "mlp.shared_expert_gate")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), ("mlp.gate",)),
}
DENSE = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
SHARED = ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]


def _torch(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def torch_expert_hessians(
    model, ids: np.ndarray, mask: np.ndarray, block: int, min_tokens: int
) -> tuple[dict[tuple[int, str], np.ndarray], list[int]]:
    """{(expert, "gate_up" | "down"): H} of one block, float64, and each expert's routed real-token count."""
    cfg = model.config
    moe = model.get_submodule(f"model.layers.{block}.mlp")  # in memory the MoE block is `mlp` for all three
    got: dict[str, torch.Tensor] = {}
    hooks = [
        moe.gate.register_forward_hook(lambda m, a, out: got.__setitem__("logits", out[0].detach())),
        moe.experts.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].detach())),
    ]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    for h in hooks:
        h.remove()
    k = cfg.num_experts_per_tok
    probs = torch.softmax(got["logits"].double(), dim=-1)  # [B*S, E]
    top, idx = torch.topk(probs, k, dim=-1)
    if getattr(cfg, "norm_topk_prob", True):  # mixtral always renormalises (no such config field)
        top = top / top.sum(-1, keepdim=True)
    r = torch.zeros_like(probs).scatter(1, idx, top)
    real = torch.from_numpy(mask.reshape(-1)).double()
    x = got["x"].double()
    wgu = moe.experts.gate_up_proj.detach().double()
    n = ids.shape[0]
    out, counts = {}, []
    for e in range(r.shape[1]):
        gate, up = (x @ wgu[e].T).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        routed = int(((r[:, e] > 0) & (real > 0)).sum())
        counts.append(routed)
        w = real if routed < min_tokens else real * r[:, e]  # fallback: every real token, weight 1
        for key, a in (("gate_up", x), ("down", h)):
            aw = a * w[:, None]
            out[(e, key)] = (2.0 / n * aw.T @ aw).numpy()
    return out, counts


def _block_model(arch: str, merged_dir, base: torch.nn.Module, block: int) -> torch.nn.Module:
    """The merged model with block `block` put back to the base's (what the merged source captures)."""
    m = _torch(merged_dir)
    m.model.layers[block].load_state_dict(base.model.layers[block].state_dict())
    return m


def _close(got: np.ndarray, ref: np.ndarray, msg: str) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=msg)


CASES = [(a, "base") for a in sorted(MOE)] + [(a, "merged") for a in sorted(MOE)]


@pytest.mark.parametrize("arch,source", CASES)
def test_expert_hessians_equal_torch_routing_weighted_hooks(arch, source, tmp_path):
    paths = H.make_family(tmp_path, arch)
    base = _torch(paths["base"])
    raw = H.config_dict(paths, tmp_path, hessian_source=source)
    calib = load_calibration(parse_config(raw).calibration, load_tokenizer(str(paths["base"])), None)
    ids, mask = calib.input_ids, calib.mask
    if source == "base":
        # A minimum between the fewest and the most tokens any expert gets: both rules run.
        counts = sorted(c for b in range(LAYERS) for c in torch_expert_hessians(base, ids, mask, b, 0)[1])
        minimum = counts[len(counts) // 2]
        assert counts[0] < minimum <= counts[-1]
        raw["moe_min_tokens"] = minimum
    else:
        minimum = 32  # the default: hidden_size
    sink: dict = {}
    rep = run_merge(parse_config(raw), tmp_path / "merged", progress=False, hessian_sink=sink)
    rows = {r["name"]: r for r in rep["layers"]}
    prefix, (g, u, d), routers = MOE[arch]
    fell = []
    for b in range(LAYERS):
        ref_model = base if source == "base" else _block_model(arch, tmp_path / "merged", base, b)
        want, counts = torch_expert_hessians(ref_model, ids, mask, b, minimum)
        for e, count in enumerate(counts):
            for n, key in ((g, "gate_up"), (u, "gate_up"), (d, "down")):
                name = f"model.layers.{b}.{prefix}.experts.{e}.{n}.weight"
                _close(sink[name], want[(e, key)], f"{arch} {source} {name}")
                assert rows[name]["hessian_tokens"] == [count], name
                assert rows[name]["hessian_fallback"] == [count < minimum], name
                assert rows[name]["trim"] == "sparsegpt"
            fell.append(count < minimum)
        dense = DENSE + (SHARED if arch == "qwen2_moe" else [])
        ref = H.torch_hessians(ref_model, ids, mask, f"model.layers.{b}.", dense)
        for n in dense:
            name = f"model.layers.{b}.{n}.weight"
            _close(sink[name], ref[n], f"{arch} {source} {name}")
            assert rows[name]["hessian_tokens"] == [int(mask.sum())] and rows[name]["hessian_fallback"] == [False]
        for n in routers:  # gates are merged data-free, with the method's own trim
            row = rows[f"model.layers.{b}.{n}.weight"]
            assert not row["linear"] and row["trim"] == "magnitude" and row["hessian_tokens"] is None
            assert f"model.layers.{b}.{n}.weight" not in sink
    if source == "base":
        assert any(fell) and not all(fell)
    merged = _torch(tmp_path / "merged")
    with torch.no_grad():
        logits = merged(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    assert torch.isfinite(logits).all()
    sd, base_sd = merged.state_dict(), base.state_dict()
    assert not torch.equal(
        sd["model.layers.1.mlp.experts.gate_up_proj"], base_sd["model.layers.1.mlp.experts.gate_up_proj"]
    )


def test_per_task_stacks_each_models_own_routing(tmp_path):
    """per_task: H[t] of an expert is weighted by fine-tune t's own router over its own hidden states."""
    arch = "qwen2_moe"
    paths = H.make_family(tmp_path, arch)
    raw = H.config_dict(paths, tmp_path, hessian_source="per_task")
    sink: dict = {}
    rep = run_merge(parse_config(raw), tmp_path / "merged", progress=False, hessian_sink=sink)
    rows = {r["name"]: r for r in rep["layers"]}
    calib = load_calibration(parse_config(raw).calibration, load_tokenizer(str(paths["base"])), None)
    fts = [_torch(p) for p in paths["fts"]]
    for b in range(LAYERS):
        per = [torch_expert_hessians(ft, calib.input_ids, calib.mask, b, 32) for ft in fts]
        for e in range(4):
            for n, key in (("gate_proj", "gate_up"), ("down_proj", "down")):
                name = f"model.layers.{b}.mlp.experts.{e}.{n}.weight"
                assert sink[name].shape[0] == 2
                for t in range(2):
                    _close(sink[name][t], per[t][0][(e, key)], f"task {t} {name}")
                assert rows[name]["hessian_tokens"] == [per[t][1][e] for t in range(2)]
                assert rows[name]["hessian_fallback"] == [per[t][1][e] < 32 for t in range(2)]
    # The tasks' routers differ, so their routed token sets do (else this test could not tell them apart).
    assert any(len(set(r["hessian_tokens"])) > 1 for r in rep["layers"] if r["hessian_tokens"])


def test_tiny_calibration_makes_every_expert_fall_back_and_the_cli_reports_it(tmp_path):
    """Two 8-token windows give each expert at most 16 routed tokens < hidden size 32: all fall back."""
    paths = H.make_family(tmp_path, "qwen3_moe")
    raw = H.config_dict(paths, tmp_path, hessian_source="base")
    raw["calibration"].update(nsamples=2, seqlen=8)
    cfgfile = tmp_path / "merge.yaml"
    cfgfile.write_text(yaml.safe_dump(raw))
    assert main(["merge", str(cfgfile), str(tmp_path / "out"), "--quiet"]) == 0
    rep = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    experts = [r for r in rep["layers"] if ".experts." in r["name"]]
    assert len(experts) == LAYERS * 4 * 3
    assert all(r["hessian_fallback"] == [True] and r["hessian_tokens"][0] < 32 for r in experts)
    assert sum(r["hessian_tokens"][0] for r in experts if r["name"].endswith("down_proj.weight")) == 16 * 2 * LAYERS
    attn = [r for r in rep["layers"] if r["name"].endswith("q_proj.weight")]
    assert all(r["hessian_fallback"] == [False] and r["hessian_tokens"] == [16] for r in attn)
    with torch.no_grad():
        assert torch.isfinite(_torch(tmp_path / "out")(input_ids=torch.tensor([[2, 3, 4, 5]])).logits).all()


@pytest.mark.parametrize("bad", [0, -3, 2.5, "many", True])
def test_moe_min_tokens_must_be_a_positive_integer(bad, tmp_path):
    raw = {"models": [{"model": "a"}], "merge_method": "task_arithmetic", "base_model": "b", "moe_min_tokens": bad}
    with pytest.raises(ConfigError, match="moe_min_tokens must be an integer >= 1"):
        parse_config(raw, tmp_path)
