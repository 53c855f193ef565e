"""Learned coefficients (AdaMerging) on a tiny LLaMA family from HF directories, handed to `sgtv merge`."""

from __future__ import annotations

import numpy as np

from convert.conversion import flax_model_tensors, load_flax_model
from sgtv_jax.merge import adamerging as ada
from sgtv_jax.models.llama import hf_block_prefix
from sgtv_jax.pipeline.calibration import load_tokenizer, token_stream, windows
from sgtv_jax.pipeline.config import parse_config
from sgtv_jax.pipeline.sequential import run_merge
from tests.helpers import tiny_models as H


def test_learned_coefficients_as_yaml_weights_reproduce_the_flax_merge(tmp_path):
    import torch
    import transformers

    paths = H.make_family(tmp_path, "llama", scale=0.05)
    base, _ = load_flax_model(paths["base"])
    fts = [load_flax_model(p)[0] for p in paths["fts"]]
    tok = load_tokenizer(paths["base"])
    calib = windows(token_stream([tmp_path / "calib.txt"], tok), nsamples=4, seqlen=16, seed=0)
    merged, coeffs, losses = ada.merge_with_learned_coefficients(
        base,
        fts,
        calib.input_ids,
        calib.mask,
        steps=4,
        learning_rate=0.05,
        batch_size=2,
        trim="magnitude",
        densities=0.5,
    )
    assert coeffs.shape == (4, 2) and losses.shape == (4,) and np.all(np.isfinite(np.asarray(losses)))
    assert not np.allclose(np.asarray(coeffs), 0.3)  # it moved from init

    rules = ada.weight_rules(coeffs, hf_block_prefix)
    raw = {
        "models": [
            {"model": str(p), "parameters": {"density": 0.5, "weight": rules[t]}} for t, p in enumerate(paths["fts"])
        ],
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "dtype": "float32",
        "trim": "magnitude",
    }
    out = tmp_path / "merged"
    run_merge(parse_config(raw), out, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    got = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    want = dict(flax_model_tensors(merged))
    assert set(want) <= set(got)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-6, atol=1e-7, err_msg=name)
    # and the merged model runs in transformers
    ids = torch.from_numpy(calib.input_ids[:1].astype(np.int64))
    assert torch.isfinite(hf(input_ids=ids).logits).all()
