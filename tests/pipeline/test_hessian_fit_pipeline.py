"""The `per_task_merged` Hessian source and the Hessian-fit methods through the YAML pipeline (tiny LLaMA)."""

from __future__ import annotations

import numpy as np
import pytest

from sgtv_jax.pipeline.config import ConfigError, parse_config
from sgtv_jax.pipeline.sequential import run_merge
from tests.helpers import tiny_models as H
from tests.pipeline.test_pipeline import LLAMA_LINEARS, _assert_h, _partial, _torch, _windows


def pref(i):
    return f"model.layers.{i}."


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_fit")
    return root, H.make_family(root, "llama")


def _config(paths, root, **over):
    raw = H.config_dict(paths, root, hessian_source="per_task_merged", **over)
    # model 1 calibrates on its own text: the two tasks' Hessians must differ
    own = root / "own.txt"
    own.write_text("Numbers like 12 and 345 appear; sums such as 7 + 8 = 15 are common. " * 8)
    raw["models"][1]["calibration"] = {"data": str(own), "nsamples": 4, "seqlen": 24, "seed": 1}
    return parse_config(raw)


@pytest.mark.parametrize("method", ["lstsq", "regmean_trim"])
def test_per_task_merged_hessians_are_each_tasks_data_through_the_merged_so_far_model(llama, method):
    root, paths = llama
    cfg = _config(paths, root, merge_method=method, parameters={})
    sink: dict = {}
    out = root / method
    rep = run_merge(cfg, out, progress=False, hessian_sink=sink)
    assert rep["hessian_source"] == "per_task_merged"
    for t in range(2):
        calib = _windows(cfg, t)
        for block in (0, 2):
            model = _partial(paths["base"], out, block, pref)
            want = H.torch_hessians(model, calib.input_ids, calib.mask, pref(block), LLAMA_LINEARS)
            for n in LLAMA_LINEARS:
                got = sink[f"{pref(block)}{n}.weight"]
                assert got.shape[0] == 2
                _assert_h(got[t], want[n], f"{method} task {t} block {block} {n}")
    # teeth: block 2's inputs are not fine-tune 0's own (per_task) nor the base model's
    calib = _windows(cfg, 0)
    for other in (paths["fts"][0], paths["base"]):
        h = H.torch_hessians(_torch(other), calib.input_ids, calib.mask, pref(2), ["mlp.down_proj"])
        assert not np.allclose(sink["model.layers.2.mlp.down_proj.weight"][0], h["mlp.down_proj"], rtol=1e-3)
    lin = [r for r in rep["layers"] if r["linear"]]
    assert lin and all(r["trim"] == "sparsegpt" for r in lin)


def test_regmean_sparse_ships_one_sparse_delta_per_layer(llama):
    root, paths = llama
    cfg = _config(paths, root, merge_method="regmean_sparse", parameters={"alpha": 1.0})
    out = root / "regmean_sparse"
    run_merge(cfg, out, progress=False)
    got, base = _torch(out).state_dict(), _torch(paths["base"]).state_dict()
    for n in LLAMA_LINEARS:
        delta = (got[f"model.layers.1.{n}.weight"] - base[f"model.layers.1.{n}.weight"]).numpy()
        rows, cols = delta.shape
        # OBS keeps round(d * rows * width) per column block of 16 (the config's blocksize)
        assert abs(np.mean(delta != 0) - 0.5) <= -(-cols // 16) / (rows * cols) + 1e-9, n


def test_fit_methods_refuse_configs_without_calibration_or_bad_options(llama):
    root, paths = llama
    raw = H.config_dict(paths, root, merge_method="lstsq", parameters={})
    del raw["calibration"]
    with pytest.raises(ConfigError, match="method 'lstsq' needs calibration data"):
        parse_config(raw)
    raw = H.config_dict(paths, root, merge_method="lstsq", parameters={"sign_election": "max"})
    with pytest.raises(ConfigError, match="sign_election must be one of none, sum, count, got 'max'"):
        parse_config(raw)


def _proxy_config(paths, root, **params):
    """RegMean on per-task Hessians; model 0 has its own calibration, model 1 none."""
    raw = H.config_dict(paths, root, merge_method="regmean", hessian_source="per_task", parameters=params)
    del raw["trim"]
    for m in raw["models"]:
        m["parameters"] = {"weight": 1.0}
    raw["models"][0]["calibration"] = raw.pop("calibration")
    return raw


def test_a_model_without_calibration_fits_its_proxy_gram(llama):
    """proxy_gram > 0: model 1's Hessians are zeros and its task vector's proxy Gram stands in (float64 oracle)."""
    from tests.merge.test_gram_balance import np_augmented
    from tests.merge.test_hessian_fit import np_regmean

    root, paths = llama
    cfg = parse_config(_proxy_config(paths, root, gram_norm="trace", proxy_gram=1.0))
    sink: dict = {}
    out = root / "proxy"
    rep = run_merge(cfg, out, progress=False, hessian_sink=sink)
    got, base = _torch(out).state_dict(), _torch(paths["base"]).state_dict()
    fts = [_torch(p).state_dict() for p in paths["fts"]]
    for n in LLAMA_LINEARS:
        key = f"{pref(1)}{n}.weight"
        h = sink[key].astype(np.float64)
        assert h.shape[0] == 2 and np.abs(h[0]).max() > 0 and not h[1].any()  # model 1: no data, zero H
        d = np.stack([(f[key] - base[key]).double().numpy() for f in fts])
        want = np_regmean(d, np_augmented(h, d, "trace", 1.0), [1.0, 1.0], 0.9)
        delta = (got[key] - base[key]).double().numpy()
        # float32 merge (solve and output): errors to 1e-4 of the largest entry
        np.testing.assert_allclose(delta, want, rtol=1e-3, atol=1e-4 * np.abs(want).max(), err_msg=n)
        # teeth: neither model 0's data alone (model 1 dropped: d_0) nor the plain mean of the task vectors
        for other in (d[0], d.mean(0)):
            assert np.abs(delta - want).max() < 0.1 * np.abs(other - want).max(), n
    lin = [r for r in rep["layers"] if r["linear"]]
    assert lin and all(r["hessian_tokens"][1] == 0 < r["hessian_tokens"][0] for r in lin)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"gram_norm": "foo"}, r"parameters\.gram_norm must be one of none, trace, energy, got 'foo'"),
        ({"proxy_gram": -1}, r"parameters\.proxy_gram"),
        ({"gram_norm": "trace"}, r"models\[1\]\.calibration\).*proxy_gram > 0"),
        ({"proxy_gram": [1.0, 0.0]}, r"needs calibration data"),  # a block at beta 0 would drop model 1
    ],
)
def test_gram_options_and_missing_data_are_config_errors(llama, params, message):
    root, paths = llama
    with pytest.raises(ConfigError, match=message):
        parse_config(_proxy_config(paths, root, **params))
