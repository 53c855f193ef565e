"""`sgtv merge` data-free with a memory budget: tensors over it merge in row chunks, with the same bytes.

A tiny Mistral (its embedding merged in the swapped `[hidden, vocab]` view)
and three fine-tunes, some tensors untouched, merged with the budget so small
that every matrix is merged a few rows at a time (ragged last chunks
included) and so large that none is: the safetensors files must be byte for
byte the same, for every method `merge_rows` streams. A method that needs
whole tensors is merged whole and reported under `not_streamed`. A NaN in a
late chunk stops the merge naming tensor and model and leaves no output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sgtv_jax.errors import NumericsError
from sgtv_jax.merge.streaming import bytes_per_entry
from sgtv_jax.pipeline.config import ConfigError, parse_config
from sgtv_jax.pipeline.memory import estimate_memory
from sgtv_jax.pipeline.sequential import REPORT_FILE, run_merge
from tests.pipeline.test_datafree_any import make_models

TASKS = 3
HUGE = "10GB"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return root, make_models(root, "mistral", tasks=TASKS, seed=3)


def _raw(paths: dict, method: str, budget: str, params: dict, **over) -> dict:
    per_model = [dict(params, weight=w) for w in (1.0, 0.7, -0.4)]
    raw = {
        "models": [{"model": str(p), "parameters": pm} for p, pm in zip(paths["fts"], per_model)],
        "merge_method": method,
        "base_model": str(paths["base"]),
        "dtype": "bfloat16",
        "seed": 11,
        "memory_budget": budget,
    }
    raw.update(over)
    return raw


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))} | {
        "config.json": (out / "config.json").read_bytes()
    }


# method, per-model parameters, top-level keys
CASES = [
    ("ties", {"density": 0.5}, {}),
    ("dare_ties", {"density": 0.6}, {}),  # random trim, seeded
    ("task_arithmetic", {}, {}),
    ("task_arithmetic", {"density": 0.4}, {"trim": "magnitude"}),
    ("breadcrumbs", {"density": 0.7, "gamma": 0.05}, {}),
    ("della", {"density": 0.5, "epsilon": 0.1}, {}),
    ("linear", {}, {}),
]


@pytest.mark.parametrize("method,params,over", CASES, ids=[f"{c[0]}-{c[2].get('trim', '')}" for c in CASES])
def test_budget_changes_no_byte(fam, tmp_path, method, params, over):
    root, paths = fam
    want = run_merge(parse_config(_raw(paths, method, HUGE, params, **over)), tmp_path / "whole", progress=False)
    assert want["memory_budget"] == 10**10 and want["not_streamed"] == [] and want["streamed_chunks"] == {}
    # the largest matrix [48, 16]: a 3 KB budget merges 2 rows of 16 columns at a time, 1 of 24
    assert 3000 // (16 * bytes_per_entry(TASKS)) == 2
    rep = run_merge(parse_config(_raw(paths, method, "3KB", params, **over)), tmp_path / "rows", progress=False)
    assert rep["not_streamed"] == []
    chunks = rep["streamed_chunks"]  # every matrix, in several chunks
    # DELLA ranks rows of the merge order; the swapped embedding's are stored columns: one chunk
    assert chunks["model.embed_tokens.weight"] == (1 if method == "della" else 24)
    assert chunks["model.layers.0.mlp.down_proj.weight"] == 16
    assert len(chunks) == sum(len(r["shape"]) == 2 for r in rep["layers"] if r["trim"] != "base")
    whole, rows = _files(tmp_path / "whole"), _files(tmp_path / "rows")
    assert whole.keys() == rows.keys()
    for name in whole:
        assert whole[name] == rows[name], name
    # the report says the same about every tensor (trim applied, fraction kept)
    by_name = {r["name"]: r for r in want["layers"]}
    for r in rep["layers"]:
        w = by_name[r["name"]]
        assert r["trim"] == w["trim"], r["name"]
        np.testing.assert_allclose(r["kept_density"], w["kept_density"], rtol=1e-6, atol=0)


def test_whole_tensor_methods_are_merged_whole_and_reported(fam, tmp_path):
    root, paths = fam
    raw = _raw(paths, "karcher", "3KB", {})
    rep = run_merge(parse_config(raw), tmp_path / "rows", progress=False)
    whole = run_merge(parse_config(dict(raw, memory_budget=HUGE)), tmp_path / "whole", progress=False)
    assert whole["not_streamed"] == []
    reasons = {r["name"]: r["why"] for r in rep["not_streamed"]}
    assert "model.embed_tokens.weight" in reasons and "needs whole tensors" in reasons["model.embed_tokens.weight"]
    assert _files(tmp_path / "rows") == _files(tmp_path / "whole")


def test_memory_budget_must_be_a_size(fam):
    root, paths = fam
    for bad in ("lots", 0, -5, True, [1]):
        with pytest.raises(ConfigError, match="memory_budget"):
            parse_config(_raw(paths, "ties", "1GB", {"density": 0.5}, memory_budget=bad))
    assert parse_config(_raw(paths, "ties", "1GiB", {"density": 0.5})).memory_budget == 1 << 30


def test_nan_in_a_late_chunk_names_it_and_leaves_no_output(fam, tmp_path):
    root, paths = fam
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in paths["fts"][1].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    st = next(bad.glob("*.safetensors"))
    tensors = load_file(str(st))
    name = "model.layers.2.mlp.down_proj.weight"
    tensors[name][-1, 3] = np.nan  # the last row: read by the last chunk only
    save_file(tensors, str(st), metadata={"format": "pt"})
    raw = _raw(dict(paths, fts=[paths["fts"][0], bad, paths["fts"][2]]), "ties", "3KB", {"density": 0.5})
    out = tmp_path / "out"
    with pytest.raises(NumericsError, match=rf"{name}.*models\[1\]"):
        run_merge(parse_config(raw), out, progress=False)
    assert not out.exists()
    assert not list(tmp_path.glob(".*partial*"))
    # the same merge without the NaN succeeds, and the report records the budget
    rep = run_merge(parse_config(_raw(paths, "ties", "3KB", {"density": 0.5})), out, progress=False)
    assert json.loads((out / REPORT_FILE).read_text())["memory_budget"] == rep["memory_budget"] == 3000


def test_check_states_the_bounded_formula(fam):
    root, paths = fam
    per = bytes_per_entry(TASKS)
    assert per == 12 + 20 * TASKS
    whole = estimate_memory(parse_config(_raw(paths, "ties", HUGE, {"density": 0.5})))
    assert whole.term("tensor").bytes == 48 * 16 * per  # the embedding, merged whole
    rows = estimate_memory(parse_config(_raw(paths, "ties", "3KB", {"density": 0.5})))
    # in chunks: 2 rows of 16 (embedding) or 1 row of 24 (down_proj), whichever is more
    assert rows.term("tensor").bytes == max(2 * 16, 24) * per
    assert "formula" in rows.summary() and f"max(B, R*{per})" in rows.summary()
