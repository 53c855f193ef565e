"""One parameter-spec resolver for the Python API and the YAML; per-model values fall back per model.

The fallback test is the regression test of a bug: a config where one model
set `gamma` (or `epsilon`) and another did not used the trims' default for
every model, silently dropping the value that was given. Expectations are
hand-computed (interpolation points, breadcrumbs' kept ranks in NumPy).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

import sgtv_jax.merge as M
from sgtv_jax.merge import paramspec
from sgtv_jax.merge.plan import merge_planned
from sgtv_jax.pipeline.config import ConfigError, parse_config
from sgtv_jax.pipeline.planning import plan_tensor


def test_resolve_plain_callable_rules_and_gradient():
    assert paramspec.resolve(0.3, "a.mlp") == 0.3
    assert paramspec.resolve(lambda n: len(n), "a.mlp") == 5
    rules = [{"filter": "mlp", "value": [{"filter": "a.", "value": 0.1}, {"value": 0.2}]}, {"value": [0.0, 1.0]}]
    assert paramspec.resolve(rules, "a.mlp") == 0.1  # nested rules
    assert paramspec.resolve(rules, "b.mlp") == 0.2
    assert paramspec.resolve(rules, "layers.1.attn", 1, 5) == pytest.approx(0.25)  # rule value: a gradient
    assert paramspec.resolve(rules, "lm_head", None, 5) == 1.0  # outside the blocks, not an embedding: 1
    assert paramspec.resolve(rules, "wte", None, 5) == 0.0
    assert paramspec.resolve([0.7], "x") == 0.7
    with pytest.raises(paramspec.SpecError, match="gradient .* for tensor 'attn' needs the tensor's decoder block"):
        paramspec.resolve([0.0, 1.0], "attn")
    with pytest.raises(paramspec.SpecError, match="no filter rule matches tensor 'attn'"):
        paramspec.resolve([{"filter": "mlp", "value": 1}], "attn")
    with pytest.raises(paramspec.SpecError, match="has no 'value'"):
        paramspec.resolve([{"filter": "mlp"}], "mlp")


def test_per_model_takes_the_default_per_model_only():
    assert paramspec.per_model([0.05, None, [{"filter": "x", "value": None}, {"value": 0.3}]], "x", 0.01) == (
        0.05,
        0.01,
        0.01,
    )
    assert paramspec.split_per_model(0.5, 3, "densities") == [0.5] * 3
    rules = [{"filter": "a", "value": 1.0}, {"value": 0.0}]
    assert paramspec.split_per_model(rules, 2, "weights") == [rules, rules]
    with pytest.raises(paramspec.SpecError, match="weights has 2 entries but there are 3 fine-tuned models"):
        paramspec.split_per_model([1, 1], 3, "weights")


def _breadcrumbs(d: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Keep the entries ranked [round(gamma n), round(gamma n) + round(density n)) by |d|, descending."""
    flat = d.ravel()
    n = flat.size
    top, k = round(gamma * n), round(density * n)
    order = np.argsort(-np.abs(flat), kind="stable")
    out = np.zeros_like(flat)
    out[order[top : top + k]] = flat[order[top : top + k]]
    return out.reshape(d.shape)


def _config(gammas, top=None):
    models = [
        {"model": f"ft_{i}", "parameters": {"density": 0.5} | ({} if g is None else {"gamma": g})}
        for i, g in enumerate(gammas)
    ]
    params = {} if top is None else {"gamma": top}
    return parse_config({"models": models, "merge_method": "breadcrumbs", "base_model": "base", "parameters": params})


def test_yaml_gamma_missing_for_one_model_keeps_the_others():
    name = "model.layers.0.mlp.up_proj.weight"
    assert plan_tensor(_config([0.05, None]), name, 0, 2, linear=True).gamma == (0.05, 0.01)
    assert plan_tensor(_config([0.05, None], top=0.02), name, 0, 2, linear=True).gamma == (0.05, 0.02)
    assert plan_tensor(_config([None, None]), name, 0, 2, linear=True).gamma == (0.01, 0.01)
    assert plan_tensor(_config([0.05, None]), name, 0, 2, linear=True).epsilon == (0.15, 0.15)
    # the plan's merge trims each model with its own gamma (n = 200: 10 vs 2 outliers dropped)
    d = np.random.default_rng(0).standard_normal((2, 10, 20))
    plan = plan_tensor(_config([0.05, None]), name, 0, 2, linear=True)
    merged, trimmed, _ = merge_planned(plan, jnp.asarray(d, jnp.float32))
    want = np.stack([_breadcrumbs(d[0], 0.5, 0.05), _breadcrumbs(d[1], 0.5, 0.01)])
    np.testing.assert_allclose(np.asarray(trimmed), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(merged), want.sum(0), rtol=1e-5, atol=1e-6)


def test_yaml_resolver_errors_are_config_errors():
    cfg = parse_config(
        {
            "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}}],
            "merge_method": "linear",
            "base_model": "base",
        }
    )
    with pytest.raises(ConfigError, match="no filter rule matches tensor 'model.norm.weight'"):
        plan_tensor(cfg, "model.norm.weight", None, 2, linear=False)


def _layered(tasks=2, layers=3):
    rng = np.random.default_rng(1)
    base = {f"layers.{i}.w": rng.standard_normal((4, 5)).astype(np.float32) for i in range(layers)}
    base["embed"] = rng.standard_normal((6, 5)).astype(np.float32)
    models = [{k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()} for _ in range(tasks)]
    return base, models


def _block(name: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def test_library_gradient_over_blocks_and_per_model_none():
    base, models = _layered()
    out = M.merge("task_arithmetic", base, models, block_of=_block, weights=[[0.0, 1.0], 1.0], **{"lambda": [0.5, 1.0]})
    for i, (w0, lam) in enumerate(((0.0, 0.5), (0.5, 0.75), (1.0, 1.0))):  # positions 0, 1/2, 1
        k = f"layers.{i}.w"
        want = base[k] + lam * (w0 * (models[0][k] - base[k]) + (models[1][k] - base[k]))
        np.testing.assert_allclose(np.asarray(out[k]), want, rtol=1e-5, atol=1e-5)
    k = "embed"  # outside the blocks, an embedding: position 0
    np.testing.assert_allclose(np.asarray(out[k]), base[k] + 0.5 * (models[1][k] - base[k]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gradient .* for tensor 'layers.0.w' needs the tensor's decoder block"):
        M.merge("task_arithmetic", base, models, **{"lambda": [0.5, 1.0]})


def test_library_gamma_none_for_one_model_takes_the_default():
    rng = np.random.default_rng(2)
    base = {"w": rng.standard_normal((10, 20))}
    models = [{"w": base["w"] + rng.standard_normal((10, 20))} for _ in range(2)]
    out = M.merge("breadcrumbs", base, models, densities=0.5, gamma=[0.05, None])
    d = np.stack([m["w"] - base["w"] for m in models])
    want = _breadcrumbs(d[0], 0.5, 0.05) + _breadcrumbs(d[1], 0.5, 0.01)
    np.testing.assert_allclose(np.asarray(out["w"]) - base["w"], want, rtol=1e-5, atol=1e-5)
