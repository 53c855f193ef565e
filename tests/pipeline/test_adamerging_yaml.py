"""`merge_method: adamerging` through `sgtv merge` (run_merge) on a tiny LLaMA family, and its config checks."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.conversion import flax_model_tensors, load_flax_model
from sgtv_jax.merge import adamerging as ada
from sgtv_jax.merge import task_arithmetic
from sgtv_jax.merge.registry import get_method
from sgtv_jax.pipeline.calibration import load_tokenizer, token_stream, windows
from sgtv_jax.pipeline.config import ConfigError, parse_config
from sgtv_jax.pipeline.datafree import require_flax_family
from sgtv_jax.pipeline.memory import estimate_memory
from sgtv_jax.pipeline.sequential import REPORT_FILE, run_merge
from tests.helpers import tiny_models as H

STEPS, LR, DENSITY, NSAMPLES, SEQLEN, BATCH, SEED = 4, 0.05, 0.5, 4, 16, 2, 3


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("adamerging_yaml")
    return root, H.make_family(root, "llama", scale=0.05)


def _raw(root, paths, **over):
    raw = {
        "models": [{"model": str(p), "parameters": {"density": DENSITY}} for p in paths["fts"]],
        "merge_method": "adamerging",
        "base_model": str(paths["base"]),
        "dtype": "float32",
        "trim": "magnitude",
        "parameters": {"steps": STEPS, "learning_rate": LR, "init": 0.3},
        "calibration": {"data": str(root / "calib.txt"), "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": 0},
        "batch_size": BATCH,
        "seed": SEED,
    }
    raw.update(over)
    return raw


def _tensors(out):
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    return got


def test_yaml_adamerging_writes_the_library_learned_merge_deterministically(family, tmp_path):
    root, paths = family
    cfg = parse_config(_raw(root, paths))
    rep = run_merge(cfg, tmp_path / "a", progress=True)  # the bar's callback runs here

    # (a) the library's learned merge of the same models, windows, trim and seed
    base, _ = load_flax_model(paths["base"])
    fts = [load_flax_model(p)[0] for p in paths["fts"]]
    calib = windows(token_stream([root / "calib.txt"], load_tokenizer(paths["base"])), NSAMPLES, SEQLEN, seed=0)
    merged, coeffs, losses = ada.merge_with_learned_coefficients(
        base,
        fts,
        calib.input_ids,
        calib.mask,
        steps=STEPS,
        learning_rate=LR,
        seed=SEED,
        batch_size=BATCH,
        trim="magnitude",
        densities=DENSITY,
    )
    assert not np.allclose(np.asarray(coeffs), 0.3)  # it learned something: the weights are not init's
    got = _tensors(tmp_path / "a")
    want = dict(flax_model_tensors(merged))
    assert set(want) <= set(got)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-6, atol=1e-7, err_msg=name)

    # (b) the report: the same coefficients (the bar only observes), losses, groups; the config as given
    ada_rep = json.loads((tmp_path / "a" / REPORT_FILE).read_text())["adamerging"]
    assert ada_rep == json.loads(json.dumps(rep["adamerging"]))
    np.testing.assert_array_equal(np.asarray(ada_rep["coefficients"]), np.asarray(coeffs, np.float64))
    np.testing.assert_array_equal(np.asarray(ada_rep["losses"]), np.asarray(losses, np.float64))
    assert ada_rep["groups"] == ["model.layers.0.", "model.layers.1.", "model.layers.2.", ""]
    assert ada_rep["steps"] == STEPS and ada_rep["calibration_windows"] == NSAMPLES
    assert rep["config"]["merge_method"] == "adamerging" and "learn" in rep["stages_s"]
    assert "adamerging + magnitude" in (tmp_path / "a" / "README.md").read_text()

    # (c) the same config again (without the bar): the same bits
    run_merge(cfg, tmp_path / "b", progress=False)
    again = _tensors(tmp_path / "b")
    assert set(again) == set(got)
    for name in got:
        np.testing.assert_array_equal(again[name], got[name], err_msg=name)
    rep_b = json.loads((tmp_path / "b" / REPORT_FILE).read_text())["adamerging"]
    assert rep_b["coefficients"] == ada_rep["coefficients"]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"trim": "sparsegpt"}, "trim 'sparsegpt' reads per-layer calibration statistics"),
        ({"trim": "wanda"}, "trim 'wanda' reads per-layer calibration statistics"),
        ({"trim": "magprune"}, "trim 'magprune' is not applied by its learning pass"),
        ({"trim": [{"filter": "mlp", "value": "magnitude"}, {"value": "random"}]}, "trim: merge_method 'adamerging'"),
        ({"parameters": {"steps": 0}}, r"parameters.steps must be an integer in \[1, 100000\], got 0"),
        ({"parameters": {"learning_rate": 0.0}}, "parameters.learning_rate must be > 0"),
        ({"parameters": {"init": 1.5}}, r"parameters.init must be in \[0, 1\] while parameters.clip is true"),
        ({"parameters": {"init": [0.1, 0.5]}}, "parameters.init must be one value"),
        ({"parameters": {"batch_size": 4}}, "'batch_size' is a top-level key"),
        ({"parameters": {"weight": 0.5}}, "parameters.weight: merge_method 'adamerging' learns"),
        ({"calibration": None}, "method 'adamerging' needs calibration data"),
    ],
)
def test_config_refuses_what_adamerging_cannot_take(family, over, message):
    root, paths = family
    with pytest.raises(ConfigError, match=message):
        parse_config(_raw(root, paths, **over))


def test_config_refuses_per_model_weights_gradients_and_calibration(family):
    root, paths = family
    raw = _raw(root, paths)
    raw["models"][0]["parameters"] = {"density": [0.2, 0.8], "weight": 1.0}
    raw["models"][1]["calibration"] = {"data": str(root / "calib.txt")}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    msg = str(e.value)
    assert "models[0].parameters.weight: merge_method 'adamerging' learns every model's weights" in msg
    assert "models[0].parameters.density must be one number for merge_method 'adamerging'" in msg
    assert "models[1].calibration: merge_method 'adamerging' learns from one calibration set" in msg
    # without them it is valid, and asks for calibration data
    cfg = parse_config(_raw(root, paths))
    assert cfg.needs_calibration() and cfg.merge_method == "adamerging"


def test_architecture_without_a_flax_family_is_refused_by_name(family):
    root, paths = family
    cfg = parse_config(_raw(root, paths))
    with pytest.raises(ConfigError, match="'adamerging' learns its coefficients .* 'falcon' has no Flax family"):
        require_flax_family(cfg, "falcon")


def test_sgtv_check_and_methods_know_adamerging(family, tmp_path, capsys):
    import yaml

    from sgtv_jax.cli import main

    root, paths = family
    f = tmp_path / "ada.yaml"
    f.write_text(yaml.safe_dump(_raw(root, paths)))
    assert main(["check", str(f)]) == 0
    out = capsys.readouterr().out
    assert "OK: llama, 3 blocks" in out
    # the estimate is the learning pass's: 4 (2T + 2) P for T = 2 float32 models of P parameters
    params = sum(v.size for v in load_file(str(paths["base"] / "model.safetensors")).values())
    est = estimate_memory(parse_config(_raw(root, paths)))
    assert est.term("models").bytes == 4 * 6 * params
    b, s, hf = BATCH, SEQLEN, json.loads((paths["base"] / "config.json").read_text())
    d, v, a = hf["hidden_size"], hf["vocab_size"], hf["num_attention_heads"]
    assert est.term("activations").bytes == 4 * b * s * (d * 4 + 3 * v) + 8 * a * b * s * s
    assert "formula: 4 (2T + 2) P" in out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "adamerging: layer-wise coefficients learned by entropy minimisation" in out
    assert "learns the weights from calibration data" in out


def test_per_tensor_step_is_task_arithmetic_with_the_learned_weights():
    deltas = np.random.default_rng(0).standard_normal((2, 6, 5)).astype(np.float32)
    w = [0.7, 0.2]
    kw = dict(trim="magnitude", key=jax.random.PRNGKey(0))
    got = get_method("adamerging")(deltas, w, 0.5, steps=7, learning_rate=0.1, init=0.9, clip=False, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(task_arithmetic(deltas, w, 0.5, **kw)))
    # float64 oracle: magnitude keeps the 15 largest |entries| of each task, then the weighted sum
    want = np.zeros((6, 5))
    for t in range(2):
        d = deltas[t].astype(np.float64)
        keep = np.abs(d) >= np.sort(np.abs(d).ravel())[-15]
        want += w[t] * d * keep
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-7)
