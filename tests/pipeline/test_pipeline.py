"""End-to-end merges of tiny random LLaMA / GPT-2 models, checked against independent PyTorch forwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers

from sgtv_jax.pipeline.calibration import load_calibration, load_tokenizer
from sgtv_jax.pipeline.check import check_config
from sgtv_jax.pipeline.config import ConfigError, parse_config
from sgtv_jax.pipeline.sequential import REPORT_FILE, run_merge
from tests.helpers import tiny_models as H

LLAMA_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
GPT2_LINEARS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return root, H.make_family(root, "llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    return root, H.make_family(root, "gpt2")


def _torch(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _partial(base_dir, merged_dir, block: int, prefix_fn) -> torch.nn.Module:
    """The merged-so-far model: merged weights outside the blocks and in blocks < `block`, base elsewhere."""
    model = _torch(base_dir)
    merged = _torch(merged_dir).state_dict()
    sd = model.state_dict()
    later = tuple(prefix_fn(i) for i in range(block, 64))
    for k in sd:
        if not k.startswith(later):
            sd[k] = merged[k]
    model.load_state_dict(sd)
    return model


def _windows(cfg, t: int = 0):
    return load_calibration(cfg.calibration_for(t), load_tokenizer(cfg.base_model), None)


def _assert_h(got, want, what):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


# --------------------------------------------------------------------------- LLaMA, merged mode


@pytest.fixture(scope="module")
def llama_merged(llama):
    root, paths = llama
    cfg = parse_config(H.config_dict(paths, root))
    sink: dict = {}
    rep = run_merge(cfg, root / "merged", progress=False, hessian_sink=sink)
    return cfg, rep, sink, root / "merged"


def test_llama_output_loads_in_transformers_and_report(llama_merged, llama):
    cfg, rep, sink, out = llama_merged
    model = _torch(out)
    assert isinstance(model, transformers.LlamaForCausalLM)
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "merge_report.json",
        "merge_layer_error.png",
        "tokenizer.json",
    } <= names
    disk = json.loads((out / REPORT_FILE).read_text())
    assert set(disk["stages_s"]) == {"load", "calibrate", "prune", "merge", "export"}
    lin = [r for r in disk["layers"] if r["linear"]]
    assert len(lin) == 3 * 7
    for r in lin:
        assert r["trim"] == "sparsegpt" and r["damping"] >= 0.01 - 1e-9
        assert all(0.0 <= e < 1.0 for e in r["trim_error"]), r
        # OBS prunes exactly round((1 - d) * rows * width) per column block of 16
        rows, cols = r["shape"]
        nblocks = -(-cols // 16)
        for k in r["kept_density"]:
            assert abs(k - 0.5) <= nblocks / (rows * cols) + 1e-9, r
    # the fine-tunes differ from base in every tensor; merged is neither base nor a fine-tune
    sd, b = model.state_dict(), _torch(llama[1]["base"]).state_dict()
    assert not torch.equal(sd["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])


def test_report_calibrate_figures_match_a_hand_count(llama_merged):
    """The tiny LLaMA (hidden 32, MLP 64, 4 heads of 8, 2 KV heads, 3 blocks), `merged` source.

    Per block and token: weights q 32x32, k 16x32, v 16x32, o 32x32, gate / up 64x32, down 32x64
    (P = 9216); two passes (capture through the base block, then the merged block): 4 * 9216 =
    36864 forward FLOPs; Grams 2 * (32^2 [qkv] + 32^2 [o] + 32^2 [gate/up] + 64^2 [down]) = 14336.
    """
    cfg, rep, _, out = llama_merged
    calib = _windows(cfg)
    n = calib.input_ids.size  # token positions one pass runs
    disk = json.loads((out / REPORT_FILE).read_text())["calibrate"]
    assert disk["token_positions"] == n == 6 * 24
    assert disk["forward_gflop"] * 1e9 == pytest.approx(3 * n * 36864, rel=1e-12)
    assert disk["hessian_gflop"] * 1e9 == pytest.approx(3 * n * 14336, rel=1e-12)
    assert disk["seconds"] == rep["stages_s"]["calibrate"] > 0
    assert disk["gflops"] == pytest.approx(3 * n * (36864 + 14336) / disk["seconds"] / 1e9)
    assert disk["matmul_gflops"] > 0
    assert disk["x_flop_count"] == pytest.approx(disk["matmul_gflops"] / disk["gflops"])


def test_block_flops_base_source_is_one_whole_pass():
    from sgtv_jax.models.groups import InputGroup
    from sgtv_jax.pipeline.calib_rate import block_flops

    linear = {"a": (6, 2), "b": (6, 2), "c": (12, 3)}  # (entries, input features)
    groups = [InputGroup(("a", "b")), InputGroup(("c",))]
    assert block_flops(linear, groups, 10, propagates=False) == (2 * 10 * 24, 2 * 10 * (4 + 9))
    assert block_flops(linear, groups, 10, propagates=True) == (4 * 10 * 24, 2 * 10 * (4 + 9))


def test_llama_merged_mode_hessians_equal_merged_so_far_inputs(llama_merged, llama):
    cfg, rep, sink, out = llama_merged
    _, paths = llama
    calib = _windows(cfg)

    def pref(i):
        return f"model.layers.{i}."

    for block in range(3):
        model = _partial(paths["base"], out, block, pref)
        want = H.torch_hessians(model, calib.input_ids, calib.mask, pref(block), LLAMA_LINEARS)
        for n in LLAMA_LINEARS:
            _assert_h(sink[f"{pref(block)}{n}.weight"], want[n], f"block {block} {n}")
    # and they are not the base model's inputs from block 1 on (the check has teeth)
    base_h = H.torch_hessians(_torch(paths["base"]), calib.input_ids, calib.mask, pref(2), ["mlp.down_proj"])
    assert not np.allclose(sink["model.layers.2.mlp.down_proj.weight"], base_h["mlp.down_proj"], rtol=1e-3)


def test_llama_per_task_hessians_equal_each_finetune_inputs(llama):
    root, paths = llama
    raw = H.config_dict(paths, root, hessian_source="per_task")
    # model 1 calibrates on two short JSONL records: one right-padded window whose padding is masked
    short = root / "short.jsonl"
    short.write_text('{"text": "The quick brown fox."}\n{"text": "Numbers like 12 appear."}\n')
    raw["models"][1]["calibration"] = {"data": str(short), "nsamples": 4, "seqlen": 48}
    cfg = parse_config(raw)
    sink: dict = {}
    run_merge(cfg, root / "per_task", progress=False, hessian_sink=sink)
    for t, ft in enumerate(paths["fts"]):
        calib = _windows(cfg, t)
        if t == 1:
            assert calib.mask.min() == 0  # padding present
        model = _torch(ft)
        for block in (0, 2):
            want = H.torch_hessians(model, calib.input_ids, calib.mask, f"model.layers.{block}.", LLAMA_LINEARS)
            for n in LLAMA_LINEARS:
                got = sink[f"model.layers.{block}.{n}.weight"]
                assert got.shape[0] == 2
                _assert_h(got[t], want[n], f"task {t} block {block} {n}")


def test_llama_base_mode_hessians_equal_base_inputs(llama):
    root, paths = llama
    cfg = parse_config(H.config_dict(paths, root, hessian_source="base"))
    sink: dict = {}
    run_merge(cfg, root / "base_mode", progress=False, hessian_sink=sink)
    calib = _windows(cfg)
    want = H.torch_hessians(_torch(paths["base"]), calib.input_ids, calib.mask, "model.layers.2.", LLAMA_LINEARS)
    for n in LLAMA_LINEARS:
        _assert_h(sink[f"model.layers.2.{n}.weight"], want[n], n)


def test_data_free_merge_equals_merge_library(llama):
    """Without calibration, every tensor equals sgtv_jax.merge.merge's TIES (same seed, same rule)."""
    from safetensors.numpy import load_file

    from sgtv_jax.merge import merge

    root, paths = llama
    raw = H.config_dict(paths, root, trim=None)
    raw.pop("calibration")
    raw["models"][1]["parameters"]["density"] = 0.3
    out = root / "dfree"
    run_merge(parse_config(raw), out, progress=False)
    base = load_file(str(paths["base"] / "model.safetensors"))
    fts = [load_file(str(p / "model.safetensors")) for p in paths["fts"]]
    want = merge("ties", base, fts, densities=[0.5, 0.3], normalize=True)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(base)
    for k in base:
        np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=k)


# --------------------------------------------------------------------------- GPT-2


def test_gpt2_merge_loads_and_hessians_follow_merged_model(gpt2):
    root, paths = gpt2
    cfg = parse_config(H.config_dict(paths, root))
    sink: dict = {}
    rep = run_merge(cfg, root / "merged", progress=False, hessian_sink=sink)
    model = _torch(root / "merged")
    assert isinstance(model, transformers.GPT2LMHeadModel)
    lin = [r for r in rep["layers"] if r["linear"]]
    assert len(lin) == 3 * 4 and all(r["trim"] == "sparsegpt" for r in lin)
    calib = _windows(cfg)

    def pref(i):
        return f"transformer.h.{i}."

    for block in (0, 2):
        partial = _partial(paths["base"], root / "merged", block, pref)
        want = H.torch_hessians(partial, calib.input_ids, calib.mask, pref(block), GPT2_LINEARS)
        for n in GPT2_LINEARS:
            _assert_h(sink[f"{pref(block)}{n}.weight"], want[n], f"block {block} {n}")
    # Conv1D layout: kept density is measured on the [out, in] view, as requested
    for r in lin:
        assert all(abs(k - 0.5) < 0.02 for k in r["kept_density"]), r


# --------------------------------------------------------------------------- bad input


def _no_weight_reads(monkeypatch):
    from convert.safetensors_reader import SafetensorsCheckpoint

    def boom(self, name):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(SafetensorsCheckpoint, "get", boom)


def test_different_architecture_refused_before_weights(llama, gpt2, monkeypatch, tmp_path):
    root, paths = llama
    raw = H.config_dict(paths, root)
    raw["models"][1]["model"] = str(gpt2[1]["fts"][0])
    _no_weight_reads(monkeypatch)
    with pytest.raises(ConfigError, match="architecture 'gpt2' differs from the base model's 'llama'"):
        run_merge(parse_config(raw), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_refused_before_weights(llama, monkeypatch, tmp_path):
    root, paths = llama
    odd = tmp_path / "ft_vocab"
    shutil.copytree(paths["fts"][0], odd)
    c = json.loads((odd / "config.json").read_text())
    c["vocab_size"] += 7
    (odd / "config.json").write_text(json.dumps(c))
    raw = H.config_dict(paths, root)
    raw["models"][0]["model"] = str(odd)
    _no_weight_reads(monkeypatch)
    with pytest.raises(ConfigError, match="vocabulary size .* differs"):
        run_merge(parse_config(raw), tmp_path / "out", progress=False)


@pytest.mark.parametrize("case", ["missing", "empty", "seqlen"])
def test_bad_calibration_refused(llama, tmp_path, case):
    root, paths = llama
    raw = H.config_dict(paths, root)
    if case == "missing":
        raw["calibration"]["data"] = str(tmp_path / "nope.txt")
        match = "nope.txt does not exist"
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("\n")
        raw["calibration"]["data"] = str(tmp_path / "empty.jsonl")
        match = "empty.jsonl is empty"
    else:
        raw["calibration"]["seqlen"] = 4096
        match = "seqlen 4096 exceeds the model's maximum of 128"
    with pytest.raises(ConfigError, match=match):
        check_config(parse_config(raw))


def test_cli_check_merge_overwrite_and_unknown_method(llama, tmp_path, capsys):
    import yaml

    from sgtv_jax.cli import main

    root, paths = llama
    raw = H.config_dict(paths, root, trim=None)
    raw.pop("calibration")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))
    assert main(["check", str(tmp_path / "m.yaml")]) == 0
    assert "OK: llama, 3 blocks" in capsys.readouterr().out
    out = tmp_path / "out"
    out.mkdir()
    assert main(["merge", str(tmp_path / "m.yaml"), str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "m.yaml"), str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file()
    raw["merge_method"] = "tis"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    assert main(["check", str(tmp_path / "bad.yaml")]) == 2
    assert "did you mean 'ties'" in capsys.readouterr().err


def test_failure_midway_leaves_nothing(llama, tmp_path, monkeypatch):
    import sgtv_jax.pipeline.sequential as seq

    root, paths = llama
    real = seq.merge_tensor

    def flaky(method, deltas, **kw):
        if kw["name"].startswith("model.layers.2."):
            raise RuntimeError("disk on fire")
        return real(method, deltas, **kw)

    monkeypatch.setattr(seq, "merge_tensor", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_merge(parse_config(H.config_dict(paths, root)), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_merge_leaves_no_complete_looking_output(llama, tmp_path):
    import yaml

    root, paths = llama
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(H.config_dict(paths, root)))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgtv_jax.cli", "merge", str(tmp_path / "m.yaml"), str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()):
            assert proc.poll() is None, "merge ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m.yaml"]
    assert all(n.startswith(".out.partial") for n in leftovers), leftovers


def test_orbax_output_equals_hf_output(llama, tmp_path):
    from safetensors.numpy import load_file

    from convert import restore_orbax
    from convert.namemaps import get_name_map

    root, paths = llama
    raw = H.config_dict(paths, root, trim=None)
    raw.pop("calibration")
    cfg = parse_config(raw)
    run_merge(cfg, tmp_path / "hf", progress=False)
    run_merge(cfg, tmp_path / "ob", format="orbax", progress=False)
    assert (tmp_path / "ob" / REPORT_FILE).is_file()
    model, hf_cfg = restore_orbax(tmp_path / "ob")
    got = get_name_map(hf_cfg["model_type"]).model_to_hf_state_dict(model)
    want = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ob"]


def test_refit_key_lowers_every_layers_trim_error(llama, tmp_path):
    """`refit: true` keeps each OBS mask and never raises a layer's trim error (same base H)."""
    root, paths = llama
    reports = {}
    for refit in (False, True):
        cfg = parse_config(H.config_dict(paths, root, hessian_source="base", refit=refit))
        assert cfg.refit is refit
        run_merge(cfg, tmp_path / f"refit-{refit}", progress=False)
        disk = json.loads((tmp_path / f"refit-{refit}" / REPORT_FILE).read_text())
        reports[refit] = {r["name"]: r for r in disk["layers"] if r["linear"]}
    assert reports[False].keys() == reports[True].keys()
    improved = 0
    for name, plain in reports[False].items():
        fitted = reports[True][name]
        assert fitted["kept_density"] == plain["kept_density"], name
        for e0, e1 in zip(plain["trim_error"], fitted["trim_error"]):
            assert e1 <= e0 * (1 + 1e-5), (name, e0, e1)
            improved += e1 < 0.99 * e0
    assert improved > 0
