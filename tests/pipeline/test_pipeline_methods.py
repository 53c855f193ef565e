"""`sgtv merge` runs the methods on whole weights and the trim options exactly as the library does.

The independent expectation is the whole-model library call
`sgtv_jax.merge.merge` on the same tensors (itself tested against float64
NumPy references), plus hand-checked invariants (slerp at t=0 is the base).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from sgtv_jax.cli import main
from sgtv_jax.merge import merge, wudi
from tests.helpers import tiny_models as H


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return root, H.make_family(root, "llama")


def _tensors(d) -> dict[str, np.ndarray]:
    return load_file(str(d / "model.safetensors"))


def _run(root, paths, name, **over) -> dict[str, np.ndarray]:
    cfg = H.config_dict(paths, root, **{"trim": None, **over})
    cfg = {k: v for k, v in cfg.items() if v is not None and k not in ("calibration", "hessian_source")}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(root / f"{name}.yaml"), str(root / name), "--quiet"]) == 0
    return _tensors(root / name)


def _library(paths, method, **kw) -> dict[str, np.ndarray]:
    base = _tensors(paths["base"])
    fts = [_tensors(p) for p in paths["fts"]][: kw.pop("models", len(paths["fts"]))]
    return merge(method, base, fts, **kw)


@pytest.mark.parametrize(
    "method,params,models",
    [
        ("slerp", {"t": 0.3}, 1),
        ("karcher", {}, 2),
        ("passthrough", {"scale": 0.5}, 1),
        ("model_stock", {}, 2),
    ],
)
def test_whole_weight_methods_equal_the_library(family, method, params, models):
    root, paths = family
    sub = dict(paths, fts=paths["fts"][:models])
    got = _run(
        root, sub, f"{method}", merge_method=method, parameters=params, models=[{"model": str(p)} for p in sub["fts"]]
    )
    if method == "karcher":  # mergekit's karcher gathers the base model's tensor as one more point
        want = merge(method, _tensors(paths["base"]), [_tensors(p) for p in (paths["base"], *sub["fts"])])
    else:
        want = _library(paths, method, models=models, **params)
    assert set(got) == set(want)
    for n in got:
        np.testing.assert_allclose(got[n], np.asarray(want[n]), rtol=1e-6, atol=1e-7, err_msg=n)
    if method == "passthrough":  # a scale changes even tensors no model touched
        base = _tensors(paths["base"])
        n = "model.norm.weight"
        np.testing.assert_allclose(got[n], 0.5 * np.asarray(_tensors(paths["fts"][0])[n]), rtol=1e-6)
        assert not np.array_equal(got[n], base[n])


def test_wudi_fits_each_matrix_as_the_block_merge_orients_it(family):
    """Linear weights as stored (`[out, in]`); the embedding in its `[hidden, vocab]` view (one-hot inputs)."""
    root, paths = family
    sub = dict(paths, fts=paths["fts"][:2])
    params = {"steps": 20, "learning_rate": 1e-3}
    got = _run(
        root, sub, "wudi", merge_method="wudi", parameters=params, models=[{"model": str(p)} for p in sub["fts"]]
    )
    base = _tensors(paths["base"])
    fts = [_tensors(p) for p in sub["fts"]]
    for n, b in base.items():
        d = np.stack([f[n] - b for f in fts])
        emb = n == "model.embed_tokens.weight"
        want = np.asarray(wudi(d.transpose(0, 2, 1) if emb else d, **params))
        np.testing.assert_allclose(got[n], b + (want.T if emb else want), rtol=1e-6, atol=1e-7, err_msg=n)


def test_slerp_at_zero_is_the_base(family):
    root, paths = family
    got = _run(
        root,
        dict(paths, fts=paths["fts"][:1]),
        "slerp0",
        merge_method="slerp",
        parameters={"t": 0.0},
        models=[{"model": str(paths["fts"][0])}],
    )
    base = _tensors(paths["base"])
    for n in got:
        np.testing.assert_allclose(got[n], base[n], rtol=0, atol=1e-6, err_msg=n)


def test_count_floor_reaches_the_trim(family):
    root, paths = family
    # density 0.3: the 32-entry norms keep round(9.6) = 10 entries, floor keeps 9
    models = [{"model": str(p), "parameters": {"density": 0.3}} for p in paths["fts"]]
    got = _run(
        root, paths, "floor", merge_method="ties", trim="magnitude", parameters={"count": "floor"}, models=models
    )
    want = _library(paths, "ties", densities=0.3, trim="magnitude", count="floor")
    rnd = _library(paths, "ties", densities=0.3, trim="magnitude")
    differs = False
    for n in got:
        np.testing.assert_allclose(got[n], np.asarray(want[n]), rtol=1e-6, atol=1e-7, err_msg=n)
        differs |= not np.array_equal(np.asarray(want[n]), np.asarray(rnd[n]))
    assert differs  # some tensor has an odd entry count: floor and round keep different numbers
