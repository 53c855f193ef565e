"""LoRA in (`model: base+adapter`, convert.lora) and LoRA out (`sgtv extract-lora`, `merge --lora`).

References: PEFT's own `merge_and_unload` on the same adapter, and a float64
NumPy application of `W + scale * B @ A` written here from the definition.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.numpy import save_file

from convert.lora import LoraCheckpoint, open_model
from convert.lora_extract import REPORT, low_rank
from convert.readers import open_checkpoint
from sgtv_jax.cli import main
from sgtv_jax.pipeline.check import check_config
from sgtv_jax.pipeline.config import load_config
from tests.helpers import tiny_models as H

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_llama")
    return root, H.make_family(root, "llama", tasks=1)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_gpt2")
    return root, H.make_family(root, "gpt2", tasks=1)


def _torch(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def peft_adapter(base_dir: Path, dst: Path, seed: int = 0, **lora) -> dict[str, np.ndarray]:
    """Save a PEFT adapter with random (non-zero) factors; returns PEFT's merge_and_unload state dict."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_torch(base_dir), peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # modules_to_save copies start equal to the base: make them differ
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(dst))
    return {k: v.detach().numpy().copy() for k, v in model.merge_and_unload().state_dict().items()}


def assert_same_as(ckpt, expected: dict[str, np.ndarray]) -> None:
    for n in ckpt.names():
        np.testing.assert_allclose(np.asarray(ckpt.get(n), np.float64), expected[n], rtol=2e-6, atol=2e-7, err_msg=n)


# --------------------------------------------------------------------------- LoRA in


def test_llama_adapter_equals_peft_merge(llama, tmp_path):
    root, fam = llama
    want = peft_adapter(
        fam["base"],
        tmp_path / "ad",
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    with open_model(fam["base"], tmp_path / "ad") as ck, open_checkpoint(fam["base"]) as base:
        assert isinstance(ck, LoraCheckpoint)
        assert ck.names() == base.names() and all(ck.shape(n) == base.shape(n) for n in ck.names())
        # 3 blocks x (q, v, down) + the embedding; lm_head (and the embedding's saved base) in full
        assert len(ck.updated()) == 10 and set(ck.replaced()) == {"lm_head.weight", "model.embed_tokens.weight"}
        assert all(s == 4.0 for s in ck.updated().values())
        assert_same_as(ck, want)
        assert not np.array_equal(ck.get("lm_head.weight"), base.get("lm_head.weight"))
        assert np.array_equal(
            ck.get("model.layers.0.self_attn.k_proj.weight"), base.get("model.layers.0.self_attn.k_proj.weight")
        )


@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_gpt2_conv1d_adapter_equals_peft_merge(gpt2, tmp_path, fan_in_fan_out):
    # PEFT follows the layer (Conv1D is [in, out]) even when the config's fan_in_fan_out is wrong; so do we
    root, fam = gpt2
    want = peft_adapter(
        fam["base"],
        tmp_path / "ad",
        r=3,
        lora_alpha=5,
        fan_in_fan_out=fan_in_fan_out,
        target_modules=["c_attn", "c_proj", "c_fc"],
    )
    with open_model(fam["base"], tmp_path / "ad") as ck:
        assert len(ck.updated()) == 12
        assert_same_as(ck, want)


def test_rslora_scale_and_regex_targets_with_patterns(llama, tmp_path):
    root, fam = llama
    regex = r".*\.layers\.[01]\.(self_attn\.q_proj|mlp\.up_proj)"
    want = peft_adapter(
        fam["base"],
        tmp_path / "ad",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=regex,
        rank_pattern={"up_proj": 2},
        alpha_pattern={"up_proj": 3},
    )
    with open_model(fam["base"], tmp_path / "ad") as ck:
        assert ck.updated() == {
            "model.layers.0.self_attn.q_proj.weight": 8 / math.sqrt(4),
            "model.layers.1.self_attn.q_proj.weight": 4.0,
            "model.layers.0.mlp.up_proj.weight": 3 / math.sqrt(2),
            "model.layers.1.mlp.up_proj.weight": 3 / math.sqrt(2),
        }
        assert_same_as(ck, want)


def write_adapter(dst: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_hand_written_adapter_against_numpy(llama, tmp_path):
    # keys with an adapter name ("lora_A.default.weight"), float16 factors, list targets matched by suffix
    root, fam = llama
    rng = np.random.default_rng(0)
    q, o = "model.layers.2.self_attn.q_proj", "model.layers.1.self_attn.o_proj"
    t = {}
    for m, (out, inp) in ((q, (32, 32)), (o, (32, 32))):
        t[f"base_model.model.{m}.lora_A.default.weight"] = rng.standard_normal((2, inp)).astype(np.float16)
        t[f"base_model.model.{m}.lora_B.default.weight"] = rng.standard_normal((out, 2)).astype(np.float16)
    ad = write_adapter(tmp_path / "ad", {"r": 2, "lora_alpha": 3, "target_modules": ["self_attn.q_proj", "o_proj"]}, t)
    with open_model(fam["base"], ad) as ck, open_checkpoint(fam["base"]) as base:
        for m in (q, o):
            a = t[f"base_model.model.{m}.lora_A.default.weight"].astype(np.float64)
            b = t[f"base_model.model.{m}.lora_B.default.weight"].astype(np.float64)
            ref = base.get(m + ".weight").astype(np.float64) + 1.5 * b @ a
            got = ck.get(m + ".weight")
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- merges with a LoRA model


def _yaml(tmp: Path, cfg: dict, name: str = "merge.yml") -> str:
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _dense_copy(base_dir: Path, adapter: Path, dst: Path) -> Path:
    """The LoRA fine-tune written out as a plain HF directory (the same float32 tensors)."""
    from convert.export import export_hf

    with open_model(base_dir, adapter) as ck:
        export_hf(ck, dst, base=ck.base, dtype="fp32")
    return dst


def test_merge_lora_model_with_full_finetune_loads_and_generates(llama, tmp_path):
    root, fam = llama
    peft_adapter(fam["base"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    ad = os.path.relpath(tmp_path / "ad", tmp_path)
    base = os.path.relpath(fam["base"], tmp_path)
    cfg = {
        "models": [
            {"model": f"{base}+{ad}", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(fam["fts"][0]), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "dtype": "float32",
    }
    path = _yaml(tmp_path, cfg)
    parsed = load_config(path)  # both parts relative to the YAML
    assert Path(parsed.models[0].model).resolve() == Path(fam["base"]).resolve()
    assert Path(parsed.models[0].adapter).resolve() == (tmp_path / "ad").resolve()
    assert check_config(parsed).tensors > 0
    assert main(["merge", path, str(tmp_path / "out"), "--quiet"]) == 0
    # the same merge from the dense equivalent of the LoRA fine-tune gives the same tensors
    cfg["models"][0]["model"] = str(_dense_copy(fam["base"], tmp_path / "ad", tmp_path / "dense"))
    assert main(["merge", _yaml(tmp_path, cfg, "dense.yml"), str(tmp_path / "out_dense"), "--quiet"]) == 0
    with open_checkpoint(tmp_path / "out") as a, open_checkpoint(tmp_path / "out_dense") as b:
        for n in a.names():
            np.testing.assert_array_equal(a.get(n), b.get(n), err_msg=n)
    model = _torch(tmp_path / "out")
    ids = model.generate(torch.tensor([[2, 3, 4]]), max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert ids.shape == (1, 8)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["config"]["models"][0]["model"] == f"{base}+{ad}"  # as written, no absolute path


def test_sparsegpt_prunes_the_lora_delta_like_a_dense_one(llama, tmp_path):
    root, fam = llama
    peft_adapter(fam["base"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"])
    dense = _dense_copy(fam["base"], tmp_path / "ad", tmp_path / "dense")
    cfg = H.config_dict({"base": fam["base"], "fts": [f"{fam['base']}+{tmp_path / 'ad'}", fam["fts"][0]]}, root)
    assert main(["merge", _yaml(tmp_path, cfg), str(tmp_path / "out"), "--quiet"]) == 0
    cfg["models"][0]["model"] = str(dense)
    assert main(["merge", _yaml(tmp_path, cfg, "dense.yml"), str(tmp_path / "out_dense"), "--quiet"]) == 0
    with open_checkpoint(tmp_path / "out") as a, open_checkpoint(tmp_path / "out_dense") as b:
        for n in a.names():
            np.testing.assert_array_equal(a.get(n), b.get(n), err_msg=n)
    rows = json.loads((tmp_path / "out" / "merge_report.json").read_text())["layers"]
    q = next(r for r in rows if r["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["trim"] == "sparsegpt" and q["kept_density"][0] == pytest.approx(0.5, abs=0.02)


# --------------------------------------------------------------------------- LoRA out


def _low_rank_model(base_dir: Path, dst: Path, rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    """base + an exactly rank-`rank` update on every block linear weight (nothing else changes)."""
    model = _torch(base_dir)
    rng = np.random.default_rng(seed)
    deltas = {}
    with torch.no_grad(), open_checkpoint(base_dir) as base:
        for n, p in model.named_parameters():
            if ".layers." in n and n.endswith("proj.weight"):
                out, inp = p.shape
                d = (rng.standard_normal((out, rank)) @ rng.standard_normal((rank, inp)) * 0.01).astype(np.float32)
                p.add_(torch.from_numpy(d))
                deltas[n] = p.numpy().astype(np.float64) - base.get(n).astype(np.float64)
    model.save_pretrained(str(dst))
    return deltas


def _peft_apply(base_dir: Path, adapter: Path) -> dict[str, np.ndarray]:
    model = peft.PeftModel.from_pretrained(_torch(base_dir), str(adapter))
    return {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}


def test_extract_full_rank_reproduces_the_model(llama, tmp_path, capsys):
    root, fam = llama
    out = tmp_path / "ad"
    assert main(["extract-lora", str(fam["fts"][0]), str(fam["base"]), str(out), "--rank", "64"]) == 0
    assert "wrote LoRA adapter" in capsys.readouterr().out
    rep = json.loads((out / REPORT).read_text())
    assert all(r["energy"] == pytest.approx(1.0, abs=1e-6) for r in rep["layers"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 64 and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(fam["base"])
    # the dense fine-tune's embeddings and norms changed too: saved in full
    assert "model.embed_tokens" in cfg["modules_to_save"] and "model.norm" in cfg["modules_to_save"]
    got = _peft_apply(fam["base"], out)
    with open_checkpoint(fam["fts"][0]) as ft, open_model(fam["base"], out) as ours:
        for n in ft.names():
            want = ft.get(n).astype(np.float64)
            np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-6, err_msg=n)
            np.testing.assert_allclose(ours.get(n), got[n], rtol=0, atol=1e-6, err_msg=n)  # LoRA in == PEFT


def test_extract_rank_r_of_rank_r_delta_is_exact_and_lower_rank_reports_energy(llama, tmp_path):
    root, fam = llama
    deltas = _low_rank_model(fam["base"], tmp_path / "m", rank=2)
    assert main(["extract-lora", str(tmp_path / "m"), str(fam["base"]), str(tmp_path / "r2"), "--rank", "2"]) == 0
    rep = json.loads((tmp_path / "r2" / REPORT).read_text())
    assert len(rep["layers"]) == len(deltas) and rep["modules_to_save"] == [] and rep["dropped"] == []
    got = _peft_apply(fam["base"], tmp_path / "r2")
    with open_checkpoint(tmp_path / "m") as m:
        for n in m.names():
            np.testing.assert_allclose(got[n], m.get(n), rtol=0, atol=1e-6, err_msg=n)
    # rank 1: the energy is s1^2 / (s1^2 + s2^2) of each delta, and the error is what it says
    assert main(["extract-lora", str(tmp_path / "m"), str(fam["base"]), str(tmp_path / "r1"), "--rank", "1"]) == 0
    rows = {r["tensor"]: r for r in json.loads((tmp_path / "r1" / REPORT).read_text())["layers"]}
    got = _peft_apply(fam["base"], tmp_path / "r1")
    base = open_checkpoint(fam["base"])
    for n, d in deltas.items():
        s = np.linalg.svd(d, compute_uv=False)
        assert rows[n]["energy"] == pytest.approx(s[0] ** 2 / np.sum(s**2), rel=1e-4)
        err = np.linalg.norm(got[n] - base.get(n) - d) / np.linalg.norm(d)
        assert err == pytest.approx(rows[n]["relative_error"], rel=1e-3)


def test_low_rank_factors_against_numpy():
    rng = np.random.default_rng(1)
    d = rng.standard_normal((20, 12))
    a, b, e = low_rank(d, 5)
    u, s, vt = np.linalg.svd(d)
    np.testing.assert_allclose(b.astype(np.float64) @ a, (u[:, :5] * s[:5]) @ vt[:5], atol=1e-5)
    assert e == pytest.approx(np.sum(s[:5] ** 2) / np.sum(s**2), rel=1e-6)
    a, b, e = low_rank(d, 50)  # capped at min(out, in)
    assert a.shape == (12, 12) and b.shape == (20, 12) and e == pytest.approx(1.0)


def test_extract_gpt2_conv1d_full_rank(gpt2, tmp_path):
    root, fam = gpt2
    assert main(["extract-lora", str(fam["fts"][0]), str(fam["base"]), str(tmp_path / "ad"), "--rank", "96"]) == 0
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and "transformer.h.0.attn.c_attn" in cfg["target_modules"]
    rep = json.loads((tmp_path / "ad" / REPORT).read_text())
    # the fine-tune changed the Conv1D biases and the tied embedding: not expressible, listed as dropped
    dropped = {r["tensor"] for r in rep["dropped"]}
    assert "transformer.h.0.attn.c_attn.bias" in dropped and "transformer.wte.weight" in dropped
    got = _peft_apply(fam["base"], tmp_path / "ad")
    with open_checkpoint(fam["fts"][0]) as ft, open_checkpoint(fam["base"]) as base:
        for n in ft.names():
            want = base.get(n) if n in dropped else ft.get(n)
            np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-6, err_msg=n)


def test_merge_lora_flag_writes_adapter_that_reproduces_the_merge(llama, tmp_path, capsys):
    root, fam = llama
    cfg = {
        "models": [{"model": str(fam["fts"][0]), "parameters": {"weight": 0.7}}],
        "merge_method": "task_arithmetic",
        "base_model": str(fam["base"]),
        "dtype": "float32",
    }
    assert main(["merge", _yaml(tmp_path, cfg), str(tmp_path / "out"), "--quiet", "--lora", "64"]) == 0
    assert "wrote LoRA adapter" in capsys.readouterr().out
    adapter = tmp_path / "out" / "adapter"
    got = _peft_apply(fam["base"], adapter)
    with open_checkpoint(tmp_path / "out") as merged:
        for n in merged.names():
            np.testing.assert_allclose(got[n], merged.get(n), rtol=0, atol=1e-6, err_msg=n)


# --------------------------------------------------------------------------- bad inputs


def _run_err(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return err


def _lora_yaml(tmp: Path, fam: dict, adapter: Path) -> str:
    cfg = {
        "models": [{"model": f"{fam['base']}+{adapter}"}, {"model": str(fam["fts"][0])}],
        "merge_method": "task_arithmetic",
        "base_model": str(fam["base"]),
        "dtype": "float32",
    }
    return _yaml(tmp, cfg)


def _good(tmp: Path, fam: dict) -> Path:
    peft_adapter(fam["base"], tmp / "ad", r=2, lora_alpha=2, target_modules=["q_proj"])
    return tmp / "ad"


def test_bad_adapters_exit_2_naming_file_and_key(llama, tmp_path, capsys):
    root, fam = llama
    ad = _good(tmp_path, fam)
    cfg_file = ad / "adapter_config.json"
    good_cfg = json.loads(cfg_file.read_text())

    def check(name: str) -> str:
        return _run_err(capsys, ["check", _lora_yaml(tmp_path, fam, ad)])

    cfg_file.write_text(json.dumps({**good_cfg, "bias": "all"}))
    assert "adapter_config.json: bias 'all' is not supported" in check("bias")
    cfg_file.write_text(json.dumps({**good_cfg, "r": 0}))
    assert "adapter_config.json: r must be a positive integer, got 0" in check("r")
    cfg_file.write_text(json.dumps({**good_cfg, "use_dora": True}))
    assert "use_dora" in check("dora")
    cfg_file.write_text(json.dumps({**good_cfg, "target_modules": ["k_proj"]}))
    err = check("targets")
    assert "adapter_model.safetensors" in err and "self_attn.q_proj.lora_A.weight" in err and "target_modules" in err
    cfg_file.write_text(json.dumps({**good_cfg, "r": 3}))
    err = check("rank")
    assert "lora_A.weight" in err and "r = 3" in err
    cfg_file.unlink()
    assert "adapter_config.json: missing" in check("missing config")
    cfg_file.write_text(json.dumps(good_cfg))
    (ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")
    err = check("bin")
    assert "adapter_model.bin: a pickled PyTorch file" in err


def test_adapter_for_another_base_and_escaping_file(llama, gpt2, tmp_path, capsys):
    root, fam = llama
    other = tmp_path / "other"
    peft_adapter(gpt2[1]["base"], other, r=2, lora_alpha=2, target_modules=["c_attn"])
    err = _run_err(capsys, ["check", _lora_yaml(tmp_path, fam, other)])
    assert "adapter_model.safetensors" in err and "transformer.h.0.attn.c_attn" in err
    # same architecture, other shapes: a LLaMA adapter made for a wider model
    t = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 64), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, 2), np.float32),
    }
    wide = write_adapter(tmp_path / "wide", {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}, t)
    err = _run_err(capsys, ["merge", _lora_yaml(tmp_path, fam, wide), str(tmp_path / "out"), "--quiet"])
    assert "wide/adapter_model.safetensors" in err and "q_proj.lora_A.weight" in err and "another base" in err
    assert not (tmp_path / "out").exists()
    # a weights file that resolves outside the adapter directory is not read
    esc = tmp_path / "esc"
    esc.mkdir()
    (esc / "adapter_config.json").write_text((wide / "adapter_config.json").read_text())
    os.symlink(wide / "adapter_model.safetensors", esc / "adapter_model.safetensors")
    err = _run_err(capsys, ["check", _lora_yaml(tmp_path, fam, esc)])
    assert "outside the model directory" in err


def test_extract_bad_rank_and_mismatched_models(llama, gpt2, tmp_path, capsys):
    root, fam = llama
    err = _run_err(capsys, ["extract-lora", str(fam["fts"][0]), str(fam["base"]), str(tmp_path / "o"), "--rank", "0"])
    assert "--rank must be a positive integer, got 0" in err
    err = _run_err(
        capsys, ["extract-lora", str(gpt2[1]["fts"][0]), str(fam["base"]), str(tmp_path / "o"), "--rank", "2"]
    )
    assert "architecture 'gpt2' differs" in err
    cfg = {"models": [{"model": str(fam["fts"][0])}], "merge_method": "task_arithmetic", "base_model": str(fam["base"])}
    err = _run_err(capsys, ["merge", _yaml(tmp_path, cfg), str(tmp_path / "o"), "--lora", "0", "--quiet"])
    assert "--lora 0" in err
    assert not (tmp_path / "o").exists()


def test_plus_parsing_rules(llama, tmp_path):
    from sgtv_jax.pipeline.config import ConfigError, parse_config

    root, fam = llama
    plain = tmp_path / "ft+v2"  # an existing directory whose name has a '+' is a plain model
    plain.symlink_to(fam["fts"][0], target_is_directory=True)
    ad = _good(tmp_path, fam)
    raw = {
        "models": [{"model": "ft+v2"}, {"model": f"{fam['base']}+ad"}],
        "merge_method": "task_arithmetic",
        "base_model": str(fam["base"]),
    }
    cfg = parse_config(raw, root=tmp_path)
    assert (cfg.models[0].model, cfg.models[0].adapter) == (str(plain), "")
    assert (cfg.models[1].model, cfg.models[1].adapter) == (str(fam["base"]), str(ad))
    # the adapter is checked when the config is read; the base model takes no adapter
    with pytest.raises(ConfigError, match=r"models\[0\].model LoRA adapter: .*nope: LoRA adapter directory not found"):
        parse_config({**raw, "models": [{"model": f"{fam['base']}+nope"}]}, root=tmp_path)
    with pytest.raises(ConfigError, match=r"base_model .* is supported in models\[\]\.model only"):
        parse_config({**raw, "base_model": f"{fam['base']}+ad"}, root=tmp_path)
