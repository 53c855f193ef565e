"""`merge_method: adamerging` with `objective: distill` through `sgtv merge` on a tiny LLaMA family, and its config checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from convert.conversion import load_flax_model
from sgtv_jax.cli import main
from sgtv_jax.defaults import DISTILL_TOPK
from sgtv_jax.merge import distill
from sgtv_jax.pipeline.calibration import load_tokenizer, token_stream, windows
from sgtv_jax.pipeline.config import ConfigError, parse_config
from sgtv_jax.pipeline.memory import estimate_memory
from sgtv_jax.pipeline.sequential import REPORT_FILE, run_merge
from tests.helpers import tiny_models as H

STEPS, LR, NSAMPLES, SEQLEN, BATCH, SEED = 6, 0.1, 4, 12, 4, 1


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("adamerging_distill")
    paths = H.make_family(root, "llama", scale=0.05)
    half = len(H.TEXT) // 2  # each task its own text
    (root / "task0.txt").write_text(H.TEXT[:half])
    (root / "task1.txt").write_text(H.TEXT[half:])
    return root, paths


def _calib(root, t):
    return {"data": str(root / f"task{t}.txt"), "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": 0}


def _raw(root, paths, **over):
    raw = {
        "models": [{"model": str(p), "calibration": _calib(root, t)} for t, p in enumerate(paths["fts"])],
        "merge_method": "adamerging",
        "base_model": str(paths["base"]),
        "dtype": "float32",
        "parameters": {"steps": STEPS, "learning_rate": LR, "objective": "distill"},
        "batch_size": BATCH,
        "seed": SEED,
    }
    raw.update(over)
    return raw


def test_distill_merge_learns_the_library_coefficients_and_lowers_the_kl(family, tmp_path):
    root, paths = family
    cfg = parse_config(_raw(root, paths))
    # sgtv check's estimate counts the cached teachers: 12 bytes x top-k per position, per task
    assert estimate_memory(cfg).term("teacher").bytes == 12 * 2 * NSAMPLES * SEQLEN * DISTILL_TOPK
    rep = run_merge(cfg, tmp_path / "a", progress=False)
    ada_rep = json.loads((tmp_path / "a" / REPORT_FILE).read_text())["adamerging"]
    assert ada_rep["objective"] == "distill" and ada_rep["calibration_windows"] == [NSAMPLES, NSAMPLES]
    losses = np.asarray(ada_rep["losses"])
    assert losses.shape == (STEPS,) and losses[-1] < losses[0]  # the summed KL to the specialists fell
    # the library's distillation on the same models and each task's own windows: the same coefficients
    tok = load_tokenizer(paths["base"])
    wins = [windows(token_stream([root / f"task{t}.txt"], tok), NSAMPLES, SEQLEN, seed=0) for t in range(2)]
    base = load_flax_model(paths["base"])[0]
    fts = [load_flax_model(p)[0] for p in paths["fts"]]
    _, coeffs, want_losses = distill.merge_with_distilled_coefficients(
        base, fts, [(w.input_ids, w.mask) for w in wins], batch_size=BATCH, steps=STEPS, learning_rate=LR, seed=SEED
    )
    np.testing.assert_array_equal(np.asarray(ada_rep["coefficients"]), np.asarray(coeffs, np.float64))
    np.testing.assert_array_equal(losses, np.asarray(want_losses, np.float64))
    assert "KL to the specialists" in (tmp_path / "a" / "README.md").read_text()
    assert rep["config"]["parameters"]["objective"] == "distill"


@pytest.mark.parametrize(
    "over, messages",
    [
        (
            {"parameters": {"objective": "kl"}},
            ["parameters.objective must be one of entropy, distill, got 'kl'"],
        ),
        (  # distill without each model's own text: the shared set would not do
            {"models": None, "calibration": "shared"},
            [
                "models[0].calibration: parameters.objective 'distill' needs each model's own calibration text",
                "calibration: unused with parameters.objective 'distill'",
            ],
        ),
        (  # one model without its own text
            {"models": "one"},
            ["models[1].calibration: parameters.objective 'distill' needs each model's own calibration text"],
        ),
        (  # entropy reads one shared set: a model's own is refused, and distill named
            {"parameters": {"objective": "entropy"}, "calibration": "shared"},
            ["models[0].calibration: merge_method 'adamerging' learns from one calibration set", "objective: distill"],
        ),
    ],
)
def test_config_refuses_bad_objective_and_distill_without_own_calibration(family, tmp_path, capsys, over, messages):
    root, paths = family
    raw = _raw(root, paths)
    if over.pop("calibration", None) == "shared":
        raw["calibration"] = _calib(root, 0)
    models = over.pop("models", "keep")
    if models is None:
        raw["models"] = [{"model": str(p)} for p in paths["fts"]]
    elif models == "one":
        del raw["models"][1]["calibration"]
    raw.update(over)
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    for m in messages:
        assert m in str(e.value)
    # through the CLI: exit 2, one last 'error:' line, nothing written (refused before any model is read)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(raw))
    assert main(["merge", str(f), str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "out").exists()
