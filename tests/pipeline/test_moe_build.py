"""`sgtv moe`: MoE checkpoints built from dense fine-tunes load and run in transformers, and route as intended.

The family: a tiny Qwen3 base and two perturbed fine-tunes whose embedding
tables (base included) carry one direction for the tokens of digit texts (A)
and another for those of word texts (B), so the texts are distinguishable
from layer 0 on, as real domains are in a real LM. Routing is measured with
transformers' own router logits (``output_router_logits``) at every layer,
on the tokens one domain has and the other lacks (the bare space token is
in both and says nothing about the domain). Gates are checked against float64
NumPy / PyTorch computations of each rule, independent of the JAX code.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.numpy import load_file

from convert import open_checkpoint
from sgtv_jax.cli import main
from sgtv_jax.moe.build import warn_degenerate

ROOT = Path(__file__).resolve().parents[2]
A = ["7 42 1024 3 99 8", "12 15 61 7 42", "1024 8 3 77 42 5", "99 3 12 8 1024", "5 61 15 42 7 3"]
B = ["density and damping merge", "task vectors are trimmed", "the base model merges", "damping the density"]
B += ["trimmed vectors merge"]


def _tiny_family_module():
    spec = importlib.util.spec_from_file_location("make_tiny_family", ROOT / "examples" / "make_tiny_family.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_family")
    paths = _tiny_family_module().make_family("qwen3", root, tasks=2, scale=0.05, seed=3)
    tok = transformers.AutoTokenizer.from_pretrained(str(paths["base"]))
    ta = {t for s in A for t in tok(s, add_special_tokens=False)["input_ids"]}
    tb = {t for s in B for t in tok(s, add_special_tokens=False)["input_ids"]}
    g = torch.Generator().manual_seed(7)
    u, v = torch.randn(64, generator=g), torch.randn(64, generator=g)
    for name in ("base", "ft_a", "ft_b"):
        m = transformers.AutoModelForCausalLM.from_pretrained(str(paths[name]))
        with torch.no_grad():
            m.model.embed_tokens.weight[sorted(ta - tb)] += 0.1 * u
            m.model.embed_tokens.weight[sorted(tb - ta)] += 0.1 * v
        m.save_pretrained(str(paths[name]))
    (root / "a.txt").write_text("\n".join(A))
    (root / "b.txt").write_text("\n".join(B))
    return {"root": root, "tok": tok, "only_a": ta - tb, "only_b": tb - ta}


def _build(family, cfg: dict, name: str, *flags: str) -> Path:
    root = family["root"]
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    out = root / name
    assert main(["moe", str(root / f"{name}.yaml"), str(out), *flags]) == 0
    return out


def _config(mode: str, **extra) -> dict:
    experts = [{"source_model": "ft_a", "positive_prompts": A[:3]}, {"source_model": "ft_b", "positive_prompts": B[:3]}]
    return {"base_model": "base", "gate_mode": mode, "dtype": "float32", "experts": experts, **extra}


def _load(out: Path):
    """The built MoE in float64 (the eager expert loop: grouped_mm has no float64 kernel)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float64, experts_implementation="eager"
    ).eval()


def _routing(model, family) -> list[float]:
    """Per expert: the share of its domain tokens, over all layers, whose router top-1 is that expert."""
    shares = []
    for e, (texts, own) in enumerate(((A, family["only_a"]), (B, family["only_b"]))):
        hits = total = 0
        for t in texts:
            ids = family["tok"](t, return_tensors="pt", add_special_tokens=False).input_ids
            keep = torch.tensor([int(i) in own for i in ids[0]])
            with torch.no_grad():
                logits = model(input_ids=ids, output_router_logits=True).router_logits
            for rl in logits:
                hits += int((rl.argmax(-1)[keep] == e).sum())
                total += int(keep.sum())
        shares.append(hits / total)
    return shares


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def _hidden_rule(base, tok, prompts: list[str]) -> np.ndarray:
    """mergekit-moe's `get_hidden_states` (last token) in float64 PyTorch: ``[L, D]``."""
    per = []
    for p in prompts:
        ids = tok((tok.bos_token or "") + p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            hs = base(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
        per.append(np.stack([h[0, -1].numpy() for h in hs]))
    return np.mean(per, axis=0)


def test_hidden_gates_follow_mergekit_rule_and_route_each_domain(family):
    cfg = _config("hidden")
    cfg["experts"][0]["negative_prompts"] = [B[3]]
    out = _build(family, cfg, "hidden")
    root, tok = family["root"], family["tok"]
    base = transformers.AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float64).eval()
    want = [
        _unit(_hidden_rule(base, tok, A[:3]) - _hidden_rule(base, tok, [B[3]])),
        _unit(_hidden_rule(base, tok, B[:3])),
    ]
    got = load_file(str(out / "model.safetensors"))
    for i in range(4):
        gate = got[f"model.layers.{i}.mlp.gate.weight"]
        np.testing.assert_allclose(gate, np.stack([w[i] for w in want]), atol=2e-6, rtol=0)
    # experts are the fine-tunes' MLPs, attention is the base's, bit for bit (float32 in, float32 out)
    ft_b, base_t = (
        load_file(str(root / "ft_b" / "model.safetensors")),
        load_file(str(root / "base" / "model.safetensors")),
    )
    np.testing.assert_array_equal(
        got["model.layers.2.mlp.experts.1.up_proj.weight"], ft_b["model.layers.2.mlp.up_proj.weight"]
    )
    np.testing.assert_array_equal(
        got["model.layers.1.self_attn.q_proj.weight"], base_t["model.layers.1.self_attn.q_proj.weight"]
    )

    model = _load(out)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 2
    assert min(_routing(model, family)) >= 0.9
    ids = tok(A[0], return_tensors="pt", add_special_tokens=False).input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert gen.shape == (1, ids.shape[1] + 4)


def _router_inputs(model, tok, text: str) -> list[np.ndarray]:
    """Each layer's router input (the MoE block's input) at every token: ``L`` arrays ``[n, D]``."""
    seen: list[np.ndarray] = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).numpy()))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=tok(text, return_tensors="pt", add_special_tokens=False).input_ids)
    for h in hooks:
        h.remove()
    return seen


def test_calibrated_gates_are_centred_means_of_the_moes_own_router_inputs(family):
    cfg = _config("calibrated")
    cfg["experts"] = [
        {"source_model": "ft_a", "calibration": "a.txt"},
        {"source_model": "ft_b", "calibration": "b.txt"},
    ]
    out = _build(family, cfg, "calibrated")
    model = _load(out)
    assert min(_routing(model, family)) >= 0.9
    # Layer l's router input in the finished MoE depends only on layers < l, whose gates were
    # final when layer l was fitted: the finished model shows exactly what the build saw.
    tok, root = family["tok"], family["root"]
    feats = [_router_inputs(model, tok, (root / f).read_text()) for f in ("a.txt", "b.txt")]
    got = load_file(str(out / "model.safetensors"))
    for i in range(4):
        means = np.stack([f[i].mean(axis=0) for f in feats])
        want = _unit(means - means.mean(axis=0))
        np.testing.assert_allclose(got[f"model.layers.{i}.mlp.gate.weight"], want, atol=2e-6, rtol=0)


def test_calibrated_lstsq_routes_each_domain(family):
    cfg = _config("calibrated", calibration_fit="lstsq")
    out = _build(family, cfg, "lstsq")
    assert min(_routing(_load(out), family)) >= 0.9


def test_cheap_embed_rule_and_fused_layout_give_the_same_model(family):
    per = _build(family, _config("cheap_embed"), "cheap")
    fused = _build(family, _config("cheap_embed"), "cheap_fused", "--expert-layout", "fused")
    root, tok = family["root"], family["tok"]
    embed = load_file(str(root / "base" / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float64)

    def rule(prompts):
        ids = [i for p in prompts for i in tok((tok.bos_token or "") + p, add_special_tokens=False)["input_ids"]]
        return _unit(_unit(embed[ids].sum(axis=0)))

    want = np.stack([rule(A[:3]), rule(B[:3])])
    got, fz = load_file(str(per / "model.safetensors")), load_file(str(fused / "model.safetensors"))
    ft_a = load_file(str(root / "ft_a" / "model.safetensors"))
    for i in range(4):
        np.testing.assert_allclose(got[f"model.layers.{i}.mlp.gate.weight"], want, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(fz[f"model.layers.{i}.mlp.gate.weight"], got[f"model.layers.{i}.mlp.gate.weight"])
        gu = fz[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        assert gu.shape == (2, 256, 64) and fz[f"model.layers.{i}.mlp.experts.down_proj"].shape == (2, 64, 128)
        pre = f"model.layers.{i}.mlp."
        np.testing.assert_array_equal(
            gu[0], np.concatenate([ft_a[pre + "gate_proj.weight"], ft_a[pre + "up_proj.weight"]])
        )
    assert not any(".experts.0." in n for n in fz)
    ids = tok(A[1] + " " + B[1], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        a, b = _load(per)(input_ids=ids).logits, _load(fused)(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["moe_upcycle_random", "moe_clown_car", "moe_qwen_shared", "moe_calibrated"])
def test_example_configs_build_loadable_models(tmp_path, name):
    cfgfile = tmp_path / f"{name}.yaml"
    shutil.copy(ROOT / "examples" / "configs" / f"{name}.yaml", cfgfile)
    fam = "qwen3" if name == "moe_calibrated" else "llama"
    _tiny_family_module().make_family(fam, tmp_path / f"tiny-{fam}")  # the folder the configs' headers name
    out = tmp_path / "out"
    assert main(["moe", str(cfgfile), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    want = {"moe_qwen_shared": "qwen2_moe", "moe_calibrated": "qwen3_moe"}.get(name, "mixtral")
    assert cfg["model_type"] == want and cfg["dtype"] == "bfloat16"
    if name == "moe_qwen_shared":  # residual_scale 0.1 scales the shared expert's down_proj (in float32)
        got, base = open_checkpoint(out), open_checkpoint(tmp_path / "tiny-llama" / "base")
        down = "model.layers.1.mlp.down_proj.weight"
        want = (base.get(down).astype(np.float32) * np.float32(0.1)).astype(
            got.dtype(down.replace("mlp.", "mlp.shared_expert."))
        )
        np.testing.assert_array_equal(got.get(down.replace("mlp.", "mlp.shared_expert.")), want)
        assert not got.get("model.layers.0.self_attn.q_proj.bias").any()  # Qwen2-MoE's biases, zero as mergekit
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok("Task vectors", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert gen.shape[1] == ids.shape[1] + 3


def test_unknown_key_is_exit_2_naming_it(family, tmp_path):
    cfg = _config("hidden", gate_mod="hidden")
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump(cfg).replace("base_model: base", f"base_model: {family['root']}/base")
    )
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "sgtv_jax.cli", "moe", str(tmp_path / "bad.yaml"), str(out)],
        capture_output=True,
        text=True,
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error:") and "Traceback" not in r.stderr
    assert "gate_mod: unsupported key" in r.stderr and str(tmp_path / "bad.yaml") in r.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["experts"][1].pop("positive_prompts"), "experts[1].positive_prompts"),
        (lambda c: c["experts"][0].update(noise=1), "experts[0].noise"),
        (lambda c: c.update(gate_mode="hiden"), "gate_mode"),
        (lambda c: c.update(architecture="deepseek"), "architecture"),
        (lambda c: c.update(experts_per_token=3), "experts_per_token"),
        (lambda c: c.update(shared_experts=[{"source_model": "base"}]), "base_model: no output architecture"),
    ],
)
def test_bad_configs_name_the_key(family, capsys, edit, named):
    cfg = _config("hidden")
    edit(cfg)
    root = family["root"]
    (root / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["moe", str(root / "bad.yaml"), str(root / "never")]) == 2
    err = capsys.readouterr().err
    assert named in err and err.strip().splitlines()[-1].startswith("error:")
    assert not (root / "never").exists()


def test_nearly_parallel_router_rows_are_warned_about(capsys):
    rng = np.random.default_rng(0)
    fine, same = rng.standard_normal((2, 8)), np.ones((2, 8)) + 1e-3 * rng.standard_normal((2, 8))
    assert warn_degenerate(np.stack([fine, same, fine])) == [1]
    assert "warning: layers 1 of 3 have nearly parallel router rows" in capsys.readouterr().err


def test_sgtv_merge_of_a_moe_writes_the_fused_layout_on_request(tmp_path, capsys):
    _tiny_family_module().make_family("qwen3_moe", tmp_path / "fam")
    cfg = {
        "models": [
            {"model": "fam/ft_a", "parameters": {"weight": 0.5}},
            {"model": "fam/ft_b", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "dtype": "float32",
        "max_shard_size": "100KB",  # several shards: a layer's experts are gathered across them
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    per, fused = tmp_path / "per", tmp_path / "fused"
    assert main(["merge", str(tmp_path / "m.yaml"), str(per), "--quiet"]) == 0
    assert main(["merge", str(tmp_path / "m.yaml"), str(fused), "--quiet", "--expert-layout", "fused"]) == 0
    index = json.loads((fused / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in index and not any(".experts.0." in n for n in index)
    assert set(index.values()) == {p.name for p in fused.glob("*.safetensors")}
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        a, b = (_load(p)(input_ids=ids).logits for p in (per, fused))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    qwen3 = {**cfg, "models": [{"model": "dense/ft_a"}, {"model": "dense/ft_b"}]}
    _tiny_family_module().make_family("qwen3", tmp_path / "dense")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(qwen3))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "d.yaml"), str(tmp_path / "never"), "--expert-layout", "fused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --expert-layout fused: needs --format hf and a mixtral")
    assert not (tmp_path / "never").exists()
