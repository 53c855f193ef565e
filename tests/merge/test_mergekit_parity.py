"""mergekit's rules where a config's base_model matters (karcher, multislerp) and arcee_fusion's exact mask.

Expectations are float64 NumPy references written from mergekit's source
(`tests/test_merge_mergekit_methods.py`: `ref_karcher`, `ref_multislerp`,
`ref_arcee`), applied to the safetensors the tiny family wrote, and compared
with what `sgtv merge` wrote:

- karcher: the Karcher mean of the listed models' weights, equal weights; a
  given base_model is one more point (mergekit gathers it with the others);
- multislerp: without base_model the weights themselves are interpolated;
  with one, the task vectors (the base is their origin, never a point);
- arcee_fusion: the mask of mergekit's rule computed in float64, softmax over
  each stored row (embeddings included, as mergekit reads them).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from sgtv_jax.cli import main
from sgtv_jax.merge.arcee_fusion import arcee_fusion, importance
from sgtv_jax.merge.interpolation import multislerp
from sgtv_jax.pipeline.config import ConfigError, parse_config
from tests.helpers import tiny_models as H
from tests.merge.test_merge_mergekit_methods import ref_arcee, ref_karcher, ref_multislerp


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return root, H.make_family(root, "llama", tasks=2)


def _load(d) -> dict[str, np.ndarray]:
    return load_file(str(d / "model.safetensors"))


def _merge(root, name: str, cfg: dict) -> dict[str, np.ndarray]:
    (root / f"{name}.yaml").write_text(yaml.safe_dump({"dtype": "float32", **cfg}))
    assert main(["merge", str(root / f"{name}.yaml"), str(root / name), "--quiet"]) == 0
    return _load(root / name)


def _assert_close(got: dict, want: dict, tol: float) -> None:
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k].astype(np.float64), want[k], rtol=tol, atol=tol, err_msg=k)


# ----------------------------------------------------------------- karcher


@pytest.mark.parametrize("with_base", [False, True])
def test_karcher_is_the_mean_of_the_listed_models_and_a_given_base(family, with_base):
    root, paths = family
    cfg = {"merge_method": "karcher", "models": [{"model": str(p)} for p in paths["fts"]]}
    if with_base:
        cfg["base_model"] = str(paths["base"])
    got = _merge(root, f"karcher_{with_base}", cfg)
    points = [_load(p) for p in paths["fts"]] + ([_load(paths["base"])] if with_base else [])
    n = len(points)
    want = {k: ref_karcher([p[k] for p in points], [1 / n] * n) for k in points[0]}
    _assert_close(got, want, 2e-5)


def test_karcher_counts_a_listed_base_once(family):
    root, paths = family
    models = [{"model": str(p)} for p in (paths["base"], *paths["fts"])]
    raw = {"merge_method": "karcher", "base_model": str(paths["base"]), "models": models}
    assert len(parse_config(raw).models) == 3
    assert len(parse_config({**raw, "models": models[1:]}).models) == 3  # the base joins
    assert len(parse_config({k: v for k, v in raw.items() if k != "base_model"}).models) == 3


# ----------------------------------------------------------------- multislerp


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_interpolates_weights_without_base_and_task_vectors_with_one(family, with_base):
    root, paths = family
    w = [0.3, 0.7]
    cfg = {
        "merge_method": "multislerp",
        "models": [{"model": str(p), "parameters": {"weight": wt}} for p, wt in zip(paths["fts"], w)],
    }
    if with_base:
        cfg["base_model"] = str(paths["base"])
    got = _merge(root, f"multislerp_{with_base}", cfg)
    fts = [_load(p) for p in paths["fts"]]
    base = {k: v.astype(np.float64) for k, v in _load(paths["base"]).items()}
    want = {}
    for k in base:
        if with_base:
            want[k] = base[k] + ref_multislerp([f[k].astype(np.float64) - base[k] for f in fts], w)
        else:
            want[k] = ref_multislerp([f[k] for f in fts], w)
    _assert_close(got, want, 2e-5)


def test_multislerp_without_base_config_rules(family):
    root, paths = family
    models = [{"model": str(p)} for p in paths["fts"]]
    cfg = parse_config({"merge_method": "multislerp", "models": models})
    assert cfg.parameters["whole_weights"] is True and len(cfg.models) == 2
    with_base = parse_config({"merge_method": "multislerp", "models": models, "base_model": str(paths["base"])})
    assert "whole_weights" not in with_base.parameters
    with pytest.raises(ConfigError, match="whole_weights is false but base_model is left out"):
        parse_config({"merge_method": "multislerp", "models": models, "parameters": {"whole_weights": False}})
    with pytest.raises(ConfigError, match=r"models\[0\]\.model is the base model itself"):
        parse_config({"merge_method": "multislerp", "models": models, "base_model": str(paths["fts"][0])})


def test_multislerp_whole_weights_function_and_jit():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((4, 6)).astype(np.float32)
    thetas = rng.standard_normal((3, 4, 6)).astype(np.float32)
    w = [0.2, 0.5, 0.3]
    want = ref_multislerp(thetas, w)
    got = base + np.asarray(multislerp(thetas - base, w, whole_weights=True, base=base), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    jitted = jax.jit(lambda d, b, ww: multislerp(d, ww, whole_weights=True, base=b))
    np.testing.assert_allclose(base + np.asarray(jitted(thetas - base, base, np.asarray(w))), want, atol=2e-5)
    with pytest.raises(ValueError, match="needs base"):
        multislerp(thetas, w, whole_weights=True)


# ----------------------------------------------------------------- arcee_fusion


def _ref_importance(tau, base):
    return ref_arcee(tau, base)[1]


@pytest.mark.parametrize("scale", [1e-3, 2e-2, 0.5, 4.0])
def test_arcee_fusion_importance_matches_float64_to_float32_rounding(scale):
    rng = np.random.default_rng(11)
    base = rng.standard_normal((40, 64)).astype(np.float32)
    tau = (scale * rng.standard_normal((40, 64))).astype(np.float32)
    want = _ref_importance(tau, base)
    got = np.asarray(importance(tau, base), np.float64)
    # mergekit's sum of p log(p/q) in float32 is ~1e-3 off at scale 2e-2: this one stays at float32 rounding
    np.testing.assert_allclose(got, want, rtol=5e-6, atol=1e-30)


def test_arcee_fusion_model_equals_float64_mergekit_rule(family):
    root, paths = family
    cfg = {
        "merge_method": "arcee_fusion",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths["fts"][0])}],
    }
    got = _merge(root, "arcee", cfg)
    base, ft = _load(paths["base"]), _load(paths["fts"][0])
    assert set(got) == set(base)
    kept = 0
    for k in base:
        b, f = base[k].astype(np.float64), ft[k].astype(np.float64)
        want, imp, thr = ref_arcee(f - b, b)
        near = np.abs(imp - thr) <= 1e-5 * thr  # within float32 rounding of the threshold: either side is right
        assert np.count_nonzero(near) <= 2, k
        np.testing.assert_array_equal(got[k][~near], (b + want)[~near].astype(np.float32), err_msg=k)
        kept += np.count_nonzero(want)
    assert kept > 0


def test_arcee_fusion_softmax_runs_over_stored_rows_of_embeddings(family):
    """The data-free pipeline merges embeddings transposed for other methods; arcee_fusion reads them as stored."""
    root, paths = family
    base, ft = _load(paths["base"]), _load(paths["fts"][0])
    got = _merge(
        root,
        "arcee_embed",
        {"merge_method": "arcee_fusion", "base_model": str(paths["base"]), "models": [{"model": str(paths["fts"][0])}]},
    )
    k = "model.embed_tokens.weight"
    stored = base[k] + np.asarray(arcee_fusion((ft[k] - base[k])[None], base=base[k]))
    swapped = base[k] + np.asarray(arcee_fusion((ft[k] - base[k]).T[None], base=base[k].T)).T
    assert not np.array_equal(stored, swapped)  # the axis matters
    np.testing.assert_array_equal(got[k], stored)
    assert math.isfinite(float(np.sum(got[k])))
