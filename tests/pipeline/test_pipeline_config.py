"""Merge config: mergekit format, our keys, errors that name the key and suggest the likely one."""

from __future__ import annotations

import numpy as np
import pytest

from sgtv_jax.pipeline.config import ConfigError, load_config, method_kwargs, parse_config, resolve_spec


def _raw(**over):
    raw = {
        "models": [
            {"model": "ft_a", "parameters": {"density": 0.5, "weight": 1.0}},
            {
                "model": "ft_b",
                "parameters": {"density": [1, 0.7, 0.1], "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
            },
        ],
        "merge_method": "ties",
        "base_model": "base",
        "parameters": {"normalize": True, "lambda": 0.8},
        "dtype": "bfloat16",
        "tokenizer_source": "base",
    }
    raw.update(over)
    return raw


def test_mergekit_example_parses_and_resolves_paths(tmp_path):
    cfg = parse_config(_raw(), root=tmp_path)
    assert cfg.base_model == str(tmp_path / "base")
    assert [m.model for m in cfg.models] == [str(tmp_path / "ft_a"), str(tmp_path / "ft_b")]
    assert cfg.dtype == "bf16" and cfg.hessian_source == "merged" and cfg.trim is None
    assert method_kwargs(cfg, "model.layers.0.mlp.up_proj.weight", 0, 3) == {"normalize": True, "lambda_": 0.8}


def test_yaml_file(tmp_path):
    import yaml

    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_raw()))
    assert load_config(tmp_path / "m.yaml").merge_method == "ties"
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_gradient_interpolates_over_blocks():
    g = [1.0, 0.7, 0.1]
    # 5 blocks: positions 0, .25, .5, .75, 1 on linspace(0, 1, 3)
    want = np.interp([0, 0.25, 0.5, 0.75, 1.0], [0, 0.5, 1.0], g)
    got = [resolve_spec(g, f"model.layers.{i}.mlp.up_proj.weight", i, 5) for i in range(5)]
    np.testing.assert_allclose(got, want)
    assert resolve_spec(g, "model.embed_tokens.weight", None, 5) == 1.0
    assert resolve_spec(g, "model.norm.weight", None, 5) == pytest.approx(0.1)


def test_filter_rules_first_match_and_nested_gradient():
    spec = [{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "self_attn", "value": 0.3}, {"value": 0.9}]
    assert resolve_spec(spec, "model.layers.1.mlp.up_proj.weight", 1, 3) == pytest.approx(0.5)
    assert resolve_spec(spec, "model.layers.1.self_attn.q_proj.weight", 1, 3) == 0.3
    assert resolve_spec(spec, "model.norm.weight", None, 3) == 0.9
    with pytest.raises(ConfigError, match="no filter rule matches"):
        resolve_spec([{"filter": "mlp", "value": 1}], "model.norm.weight", None, 3)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"merge_methd": "ties"}, "unknown key 'merge_methd' in the config \\(did you mean 'merge_method'\\?\\)"),
        ({"merge_method": "tie"}, "unknown merge_method 'tie' \\(did you mean 'ties'\\?\\)"),
        ({"hessian_source": "merge"}, "did you mean 'merged'"),
        (
            {"trim": "sparsgpt", "calibration": {"data": "c.txt"}},
            "unknown trim 'sparsgpt' \\(did you mean 'sparsegpt'\\?\\)",
        ),
        ({"parameters": {"normalise": True}}, "did you mean 'normalize'"),
        ({"calibration": {"data": "c.txt", "nsample": 4}}, "did you mean 'nsamples'"),
        ({"dtype": "bfloat61"}, "dtype 'bfloat61'"),
        ({"trim": "sparsegpt"}, "needs calibration data"),
        ({"prunen": 2}, "prunen and prunem go together"),
        (
            {"prunen": 2, "prunem": 4, "blocksize": 6, "trim": "sparsegpt", "calibration": {"data": "c"}},
            "multiple of prunem",
        ),
        ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
        (
            {"tokenizer_source": None, "tokenizer": {"tokens": {"<x>": {"source": {"kind": "one"}}}}},
            r"tokens\['<x>'\]",
        ),
        ({"tokenizer_source": None, "tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of must be an integer"),
        ({"chat_template": "chatm"}, "neither a known template"),
        ({"chat_template": "{% for m in messages %}{{ m }"}, "not valid Jinja"),
        ({"out_dtype": "float8"}, "out_dtype 'float8' is not supported"),
        ({"slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}]}]}, "either 'models'"),
        ({"refit": "yes"}, "refit must be true or false"),
        ({"refit": True}, "refit: true refits what OBS kept: it needs trim: sparsegpt"),
        ({"merge_method": "task_arithmetic"}, "does not trim by itself: add 'trim: magnitude'"),
        ({"merge_method": "linear", "trim": "magnitude"}, "'linear' does not trim"),
        ({"base_model": None}, "base_model is required"),
        ({"models": []}, "models must be a non-empty list"),
    ],
)
def test_bad_config_names_the_key(over, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_raw(**over))


def test_model_entry_typo_and_range():
    raw = _raw()
    raw["models"][0]["parameters"] = {"densty": 0.5}
    raw["models"][1]["parameters"] = {"density": 1.5}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    msg = str(e.value)
    assert "unknown key 'densty' in models[0].parameters (did you mean 'density'?)" in msg
    assert "models[1].parameters.density must be in [0.0, 1.0], got 1.5" in msg


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        parse_config(_raw(merge_method="tie", blocksize=0, hessian_source="x"))
    msg = str(e.value)
    assert "merge_method" in msg and "blocksize" in msg and "hessian_source" in msg


@pytest.mark.parametrize("name", ["ties_sparsegpt", "dare_per_task", "ties_magnitude", "adamerging", "recommended"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "configs" / f"{name}.yaml")
    assert cfg.models and cfg.base_model.endswith("base")


def test_to_dict_keeps_paths_as_written(tmp_path):
    cfg = parse_config(_raw(calibration={"data": ["c.txt", "~/d.jsonl"]}), root=tmp_path)
    assert cfg.base_model == str(tmp_path / "base") and cfg.calibration.data[0] == str(tmp_path / "c.txt")
    d = cfg.to_dict()
    assert d["base_model"] == "base"
    assert [m["model"] for m in d["models"]] == ["ft_a", "ft_b"]
    assert d["calibration"]["data"] == ["c.txt", "~/d.jsonl"]
    assert d["parameters"] == {"normalize": True, "lambda": 0.8} and d["merge_method"] == "ties"
