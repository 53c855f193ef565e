"""The PyTorch original's pipeline API: sequential_layer_pruning and the importance calculators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from convert import load_flax_model
from sgtv_jax.obs import obs_prune
from sgtv_jax.pipeline.compat import (
    TaskVectorImportanceCalculator,
    TaskVectorImportanceCalculatorPerTask,
    sequential_layer_pruning,
)
from tests.helpers import tiny_models as H

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    paths = H.make_family(root, "llama")
    base = load_flax_model(paths["base"])[0]
    fts = [load_flax_model(p)[0] for p in paths["fts"]]
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 250, size=(4, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    loader = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    return paths, base, fts, loader, ids, mask


def _torch_h(path, ids, mask, layer):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prefix, local = layer.rsplit(".", 2)[0] + ".", ".".join(layer.rsplit(".", 2)[1:])
    return H.torch_hessians(model, ids, mask, prefix, [local])[local]


def test_sequential_layer_pruning_uses_base_hessians(family):
    paths, base, fts, loader, ids, mask = family
    out = sequential_layer_pruning(base, fts, loader, LAYERS, density=0.3, blocksize=16, percdamp=0.01)
    assert set(out) == set(LAYERS)
    sd = [
        transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).state_dict()
        for p in [paths["base"]] + paths["fts"]
    ]
    for layer in LAYERS:
        h = _torch_h(paths["base"], ids, mask, layer)
        assert len(out[layer]) == 2
        for t in range(2):
            d = (sd[t + 1][layer + ".weight"] - sd[0][layer + ".weight"]).numpy()
            want, _ = obs_prune(d, h.astype(np.float32), density=0.3, blocksize=16)
            np.testing.assert_allclose(np.asarray(out[layer][t]), np.asarray(want), rtol=1e-3, atol=1e-6)
            assert np.mean(np.asarray(out[layer][t]) != 0) == pytest.approx(0.3, abs=0.02)


def test_calculators(family):
    paths, base, fts, loader, ids, mask = family
    calc = TaskVectorImportanceCalculator(base, loader)
    hs = calc.compute_hessians_for_layers(LAYERS[:1])
    np.testing.assert_allclose(
        np.asarray(hs[LAYERS[0]]), _torch_h(paths["base"], ids, mask, LAYERS[0]), rtol=1e-4, atol=1e-6
    )
    tv = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32)
    got = calc.prune_task_vector_with_error_correction(LAYERS[0], tv, 0.5, 16)
    want, _ = obs_prune(tv, hs[LAYERS[0]], density=0.5, blocksize=16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(KeyError, match="compute_hessians_for_layers"):
        calc.prune_task_vector_with_error_correction(LAYERS[1], tv, 0.5, 16)
    with pytest.raises(ValueError, match="unknown layer name"):
        calc.compute_hessians_for_layers(["model.layers.0.mlp.gate"])

    per = TaskVectorImportanceCalculatorPerTask(fts, loader)
    hp = per.compute_hessians_for_layers(LAYERS[1:2])[LAYERS[1]]
    assert hp.shape == (2, 64, 64)
    for t, p in enumerate(paths["fts"]):
        np.testing.assert_allclose(np.asarray(hp[t]), _torch_h(p, ids, mask, LAYERS[1]), rtol=1e-4, atol=1e-6)
    tvs = np.random.default_rng(2).standard_normal((2, 32, 64)).astype(np.float32)
    got = per.prune_task_vector_with_error_correction(LAYERS[1], tvs, 0.5, 16)
    want, _ = obs_prune(tvs, hp, density=0.5, blocksize=16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    one = per.prune_task_vector_with_error_correction(LAYERS[1], tvs[1], 0.5, 16, task_index=1)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(want[1]))
