"""The documented non-LLaMA merge: examples/configs/qwen3_ties_sparsegpt.yaml, verbatim, on tiny local Qwen3 models.

examples/make_tiny_family.py builds the models the config names; `sgtv check`
and `sgtv merge` run on the config file as shipped; the output must load in
transformers as a Qwen3 with finite logits, every linear layer trimmed by
SparseGPT with a finite OBS error, and the merged weights must differ from the
base's by the trimmed task vectors (nonzero, at most the density kept).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

from convert import open_checkpoint
from sgtv_jax.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "configs" / "qwen3_ties_sparsegpt.yaml"


def _make_tiny_family():
    spec = importlib.util.spec_from_file_location("make_tiny_family", ROOT / "examples" / "make_tiny_family.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_documented_qwen3_config_merges_tiny_models(tmp_path):
    cfgfile = tmp_path / CONFIG.name
    shutil.copy(CONFIG, cfgfile)
    # The folder the config's header tells users to build (its paths are relative to the config).
    paths = _make_tiny_family().make_family("qwen3", tmp_path / "tiny-qwen3")
    assert main(["check", str(cfgfile)]) == 0
    out = tmp_path / "merged"
    assert main(["merge", str(cfgfile), str(out), "--quiet"]) == 0

    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.model_type == "qwen3"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("Merging adds task vectors back to the base.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.abs().max() > 0

    report = json.loads((out / "merge_report.json").read_text())
    assert report["model_type"] == "qwen3"
    linear = [r for r in report["layers"] if r["linear"]]
    assert len(linear) == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 blocks
    assert all(r["trim"] == "sparsegpt" and np.isfinite(r["trim_error"]).all() for r in linear)

    base, ft_a = open_checkpoint(paths["base"]), open_checkpoint(paths["ft_a"])
    got = open_checkpoint(out)
    name = "model.layers.2.self_attn.q_proj.weight"
    delta = got.get(name) - base.get(name)
    assert 0 < np.count_nonzero(delta) <= 2 * 0.3 * delta.size + 1  # union of two 30% supports at most
    assert not np.array_equal(got.get(name), ft_a.get(name))
