"""mergekit's own example configs, as written in its repository, run unchanged through `sgtv merge`.

Each config below is one of mergekit's `examples/*.yml` (linear, gradient-slerp,
the orca-mini / platypus frankenmerge, the TIES half of mega.yml) with the
model names replaced by tiny local checkpoints and layer ranges scaled to their
3 layers. The expectation for every output tensor is computed here in float64
NumPy from mergekit's documented semantics, resolving the parameters by hand
(filters by substring, gradients interpolated over the layers, embeddings at
position 0 and the final norm / head at 1), independently of
`sgtv_jax.merge.paramspec` and the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from sgtv_jax.cli import main
from tests.helpers import tiny_models as H
from tests.merge.test_merge_mergekit_methods import ref_slerp
from tests.merge.test_mergekit_ties_parity import reference_ties

LAYERS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mergekit_configs")
    fam = H.make_family(root, "llama", tasks=3)
    return {"base": fam["base"], "a": fam["fts"][0], "b": fam["fts"][1], "c": fam["fts"][2]}


def _tensors(d: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _merge(config: str, models: dict[str, Path], tmp_path: Path, **names: str) -> Path:
    """Write `config` with its model names replaced by local paths; run `sgtv merge`; the output dir."""
    for name, key in names.items():
        config = config.replace(name, str(models[key]))
    (tmp_path / "merge.yml").write_text(config)
    out = tmp_path / "out"
    assert main(["merge", str(tmp_path / "merge.yml"), str(out)]) == 0
    return out


def _layer(name: str) -> int | None:
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None


def _position(name: str) -> float:
    """mergekit's gradient position: layer i of n at i / (n - 1); embeddings 0; norm and head 1."""
    i = _layer(name)
    if i is not None:
        return i / (LAYERS - 1)
    return 0.0 if "embed" in name else 1.0


def _gradient(values: list[float], name: str) -> float:
    """A gradient's value at the tensor's position: piecewise linear over evenly spaced anchors."""
    return float(np.interp(_position(name), np.linspace(0.0, 1.0, len(values)), values))


def test_linear_yml(models, tmp_path):
    """examples/linear.yml: weights 1.0 / 0.3 / 0.5, normalised (mergekit's default), float16."""
    config = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""
    out = _merge(
        config,
        models,
        tmp_path,
        **{"psmathur/orca_mini_v3_13b": "a", "WizardLM/WizardLM-13B-V1.2": "b", "garage-bAInd/Platypus2-13B": "c"},
    )
    got, srcs = _tensors(out), [_tensors(models[k]) for k in "abc"]
    w = np.array([1.0, 0.3, 0.5])
    assert set(got) == set(srcs[0])
    for name, arr in got.items():
        assert arr.dtype == np.float16, name
        want = sum(wi * s[name].astype(np.float64) for wi, s in zip(w, srcs)) / w.sum()
        # computed in float32, rounded once to float16: within one float16 step of the float64 value
        step = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(arr.astype(np.float64) - want) <= step), name


def test_gradient_slerp_yml(models, tmp_path):
    """examples/gradient-slerp.yml (as mega.yml writes it: `filter`): t per filter, a gradient over the layers."""
    config = """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 3]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 3]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float32
"""
    out = _merge(config, models, tmp_path, **{"psmathur/orca_mini_v3_13b": "base", "garage-bAInd/Platypus2-13B": "a"})
    got, t0, t1 = _tensors(out), _tensors(models["base"]), _tensors(models["a"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == LAYERS
    for name, arr in got.items():
        if "self_attn" in name:
            t = _gradient([0, 0.5, 0.3, 0.7, 1], name)
        elif "mlp" in name:
            t = _gradient([1, 0.5, 0.7, 0.3, 0], name)
        else:
            t = 0.5
        want = ref_slerp(t, t0[name].ravel(), t1[name].ravel()).reshape(arr.shape)
        np.testing.assert_allclose(arr, want, rtol=2e-5, atol=2e-6, err_msg=f"{name} (t={t})")


def test_orcamini_platy_frankenmerge_yml(models, tmp_path):
    """examples/orcamini-platy-44layer.yml: passthrough of [0, 24) of one model and [20, 40) of another."""
    config = """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 2]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [1, 3]
merge_method: passthrough
dtype: float32
"""
    out = _merge(config, models, tmp_path, **{"psmathur/orca_mini_v3_13b": "a", "garage-bAInd/Platypus2-13B": "b"})
    got, ta, tb = _tensors(out), _tensors(models["a"]), _tensors(models["b"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    for name, arr in got.items():
        i = _layer(name)
        if i is None:  # embeddings from the first slice's model, norm (and head) from the last one's
            src, src_name = (ta if "embed" in name else tb), name
        elif i < 2:
            src, src_name = ta, name
        else:
            src, src_name = tb, name.replace(f".layers.{i}.", f".layers.{i - 1}.")
        assert arr.tobytes() == src[src_name].tobytes(), name


def test_mega_yml_ties_half(models, tmp_path):
    """mega.yml's second document: TIES with a density gradient, weight filters, normalize and int8_mask."""
    config = """\
models:
  - model: ./models/gradient-slerp
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""
    out = _merge(
        config,
        models,
        tmp_path,
        **{
            "./models/gradient-slerp": "a",
            "WizardLM/WizardMath-13B-V1.0": "b",
            "TheBloke/Llama-2-13B-fp16": "base",
        },
    )
    got, t0, ta, tb = _tensors(out), _tensors(models["base"]), _tensors(models["a"]), _tensors(models["b"])
    for name, arr in got.items():
        base = t0[name].astype(np.float64)
        taus = [ta[name].astype(np.float64) - base, tb[name].astype(np.float64) - base]
        densities = [_gradient([1, 0.7, 0.1], name), 0.33]
        weights = [1.0, 0.5 if "mlp" in name else 0.0]
        # counts: ours round(density * n) (mergekit truncates; `count: floor` gives that, see docs/methods.md)
        merged, _ = reference_ties(taus, weights, densities, count="round")
        np.testing.assert_allclose(arr, base + merged, rtol=1e-5, atol=1e-6, err_msg=name)


def test_int8_mask_must_be_a_bool(models, tmp_path):
    raw = {
        "models": [{"model": str(models["a"])}],
        "base_model": str(models["base"]),
        "merge_method": "ties",
        "parameters": {"int8_mask": "yes"},
    }
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(raw))
    assert main(["check", str(tmp_path / "bad.yml")]) != 0
