"""Linear layers no fine-tune changed get no Gram (`driver.untouched_linear`): the merge reads none.

Fine-tunes of a tiny LLaMA that leave block 0 and block 2's q / k / v as the
base: those layers' input groups accumulate no Gram (a spy on `sources.capture`),
their merge is the base tensor, and every other tensor equals the merge that
computes every Gram (a `hessian_sink` turns the skip off) to float32 rounding:
the streams move through an untouched block by the block forward without capture.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sgtv_jax.pipeline import sources
from sgtv_jax.pipeline.config import parse_config
from sgtv_jax.pipeline.sequential import run_merge
from tests.helpers import tiny_models as H

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _untouched(name: str) -> bool:
    return name.startswith("model.layers.0.") or any(name == f"model.layers.2.{n}.weight" for n in QKV)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("untouched")
    paths = H.make_family(root, "llama")
    base = load_file(paths["base"] / "model.safetensors")
    for ft in paths["fts"]:
        f = ft / "model.safetensors"
        tensors = load_file(f)
        save_file({n: base[n] if _untouched(n) else a for n, a in tensors.items()}, f, metadata={"format": "pt"})
    return root, paths, base


@pytest.mark.parametrize("source", ["per_task", "base", "per_task_merged"])
def test_untouched_linear_layers_get_no_gram_and_merge_to_the_base(family, source, monkeypatch):
    root, paths, base = family
    raw = H.config_dict(paths, root, merge_method="regmean_sparse", hessian_source=source, parameters={"alpha": 0.9})
    cfg = parse_config(raw)
    full_rep = run_merge(cfg, root / f"full_{source}", progress=False, hessian_sink={})
    captured: list[tuple[int, tuple[str, ...]]] = []
    real = sources.capture

    def spy(arch, i, state, stream, groups, *args):
        captured.extend((i, g.names) for g in groups)
        return real(arch, i, state, stream, groups, *args)

    monkeypatch.setattr(sources, "capture", spy)
    rep = run_merge(cfg, root / f"skip_{source}", progress=False)

    assert captured and all(i != 0 for i, _ in captured)  # block 0: no capture at all
    assert (2, QKV) not in captured and (2, ("self_attn.o_proj",)) in captured
    got = load_file(root / f"skip_{source}" / "model.safetensors")
    full = load_file(root / f"full_{source}" / "model.safetensors")
    for n, a in got.items():
        if _untouched(n):
            np.testing.assert_array_equal(a, base[n], err_msg=n)
        else:
            assert not np.array_equal(a, base[n]), n
            np.testing.assert_allclose(a, full[n], rtol=1e-6, atol=1e-7, err_msg=n)  # bit-equal here
    rows = {r["name"]: r for r in rep["layers"]}
    for n in QKV:
        row = rows[f"model.layers.2.{n}.weight"]
        assert row["linear"] and row["trim"] == "unchanged" and row["hessian_tokens"] is None, row
    assert rep["calibrate"]["forward_gflop"] == pytest.approx(full_rep["calibrate"]["forward_gflop"])
    assert rep["calibrate"]["hessian_gflop"] < full_rep["calibrate"]["hessian_gflop"]
