"""The method rows: what a row declares is what its function does, `sgtv methods` and the reference show it."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sgtv_jax.merge import docs, generalized_task_arithmetic
from sgtv_jax.merge.registry import METHODS, get_method
from sgtv_jax.merge.row import ParamSpec, method_row
from sgtv_jax.merge.specs import METHOD_SPECS, PER_MODEL_DEFAULTS
from sgtv_jax.pipeline.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[2]
KEY = jax.random.PRNGKey(3)
RNG = np.random.default_rng(0)
DELTAS = RNG.normal(size=(2, 6, 8)).astype(np.float32)
BASE = RNG.normal(size=(6, 8)).astype(np.float32)
X = RNG.normal(size=(2, 8, 16))
GRAMS = np.einsum("tcn,tdn->tcd", X, X).astype(np.float32)  # per-task X_t X_t^T [T, cols, cols]

# mergekit's merge_methods/registry.py, written out (reference data, not read from our rows):
# name -> (consensus, sparsification, default_normalize, default_rescale)
MERGEKIT_GTA = {
    "task_arithmetic": (None, None, False, False),
    "ties": ("sum", "magnitude", True, False),
    "dare_ties": ("sum", "random", False, True),
    "dare_linear": (None, "random", False, True),
    "breadcrumbs": (None, "breadcrumbs", False, False),
    "breadcrumbs_ties": ("sum", "breadcrumbs", False, False),
    "della": ("sum", "magprune", True, True),
    "della_linear": (None, "magprune", False, True),
}


def _inputs(name: str) -> tuple[np.ndarray, list[float], dict]:
    """Task vectors, weights and caller-filled keywords that method `name` accepts."""
    spec = METHOD_SPECS[name]
    tasks = 1 if spec.max_models == 1 else 2
    kw: dict = {}
    if spec.trims:
        kw["key"] = KEY
    if spec.default_trim is not None:
        kw["densities"] = 0.5
    if spec.needs_base:
        kw["base"] = BASE
    if spec.needs_grams:
        kw["grams"] = GRAMS[:tasks]
    if spec.needs_targets:
        kw["targets"] = DELTAS[:tasks]
    kw.update({ps.keyword: 0.4 for ps in spec.params if ps.required})
    return DELTAS[:tasks], [1.0] * tasks, kw  # unit weights: some methods take no other


@pytest.mark.parametrize("name", list(METHOD_SPECS))
def test_the_rows_defaults_are_what_the_function_does(name):
    """Writing out every default of the row changes nothing: the row and the Python call agree."""
    spec = METHOD_SPECS[name]
    deltas, weights, kw = _inputs(name)
    explicit = {ps.keyword: ps.default for ps in spec.params if not ps.required}
    fn = get_method(name)
    np.testing.assert_array_equal(
        np.asarray(fn(deltas, weights, **kw)), np.asarray(fn(deltas, weights, **kw, **explicit))
    )


@pytest.mark.parametrize("name", list(MERGEKIT_GTA))
def test_mergekit_named_methods_are_task_arithmetic_with_mergekits_settings(name):
    consensus, trim, normalize, rescale = MERGEKIT_GTA[name]
    spec = METHOD_SPECS[name]
    assert (spec.consensus, spec.default_trim, spec.normalize_default, spec.rescale_default) == MERGEKIT_GTA[name]
    dens = 1.0 if trim is None else 0.5  # a density needs a trim
    got = METHODS[name](DELTAS, [1.0, 0.5], dens, key=KEY)
    want = generalized_task_arithmetic(
        DELTAS, [1.0, 0.5], dens, key=KEY, trim=trim, consensus=consensus, normalize=normalize, rescale=rescale
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    sig = inspect.signature(METHODS[name]).parameters
    assert sig["trim"].default == trim and sig["normalize"].default == normalize
    assert ("consensus" in sig) == (consensus is not None)
    if consensus is None:
        with pytest.raises(TypeError, match="consensus"):
            METHODS[name](DELTAS, [1.0, 0.5], consensus="sum")


def test_per_model_defaults_are_mergekits_and_the_trims():
    assert PER_MODEL_DEFAULTS["gamma"] == 0.01 and PER_MODEL_DEFAULTS["epsilon"] == 0.15
    bc, della = METHODS["breadcrumbs"], METHODS["della"]
    np.testing.assert_array_equal(np.asarray(bc(DELTAS, [1, 1], 0.5)), np.asarray(bc(DELTAS, [1, 1], 0.5, gamma=0.01)))
    got, want = della(DELTAS, [1, 1], 0.5, key=KEY), della(DELTAS, [1, 1], 0.5, key=KEY, epsilon=0.15)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _f(deltas, weights, densities=1.0, *, alpha=0.5, trim=None, key=None, calib=None, gamma=0.0, epsilon=0.0,
       blocksize=8, percdamp=0.0, refit=False, name=None):  # fmt: skip
    return deltas


def test_method_row_refuses_a_row_that_disagrees_with_its_function():
    alpha = ParamSpec("alpha", "float", lo=0.0, hi=1.0)
    spec = method_row(_f, "f", (alpha,), "doc")
    assert spec.trims and spec.param("alpha").default == 0.5 and spec.fn is _f
    with pytest.raises(TypeError, match="not the row's parameters"):
        method_row(_f, "f", (), "doc")  # alpha undeclared
    with pytest.raises(TypeError, match="not a keyword of its function"):
        method_row(_f, "f", (alpha, ParamSpec("beta", "float")), "doc")
    with pytest.raises(TypeError, match="restates a default"):
        method_row(_f, "f", (ParamSpec("alpha", "float", 0.5),), "doc")
    with pytest.raises(TypeError, match="outside what the row allows"):
        method_row(_f, "f", (ParamSpec("alpha", "float", lo=0.0, hi=0.1),), "doc")
    with pytest.raises(TypeError, match="kind"):
        method_row(_f, "f", (ParamSpec("alpha", "real"),), "doc")


def test_registry_and_public_names_are_the_rows_functions():
    import sgtv_jax.merge as M

    assert list(METHODS) == list(METHOD_SPECS)
    for name, spec in METHOD_SPECS.items():
        assert get_method(name) is spec.fn
        if name in M.__all__:  # the public functions (a submodule may share a name)
            assert getattr(M, name) is spec.fn


def test_methods_reference_is_generated_from_the_rows(capsys):
    """docs/methods-reference.md is what the rows give; `sgtv methods --markdown` prints the same."""
    committed = (ROOT / docs.REFERENCE).read_text(encoding="utf-8")
    assert committed == docs.methods_markdown(), "stale: run python -m sgtv_jax.merge.docs"
    for name in METHOD_SPECS:
        assert f"## `{name}`" in committed
    from sgtv_jax.cli import main

    assert main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out == committed
    check = [sys.executable, "-m", "sgtv_jax.merge.docs", "--check"]
    assert subprocess.run(check, cwd=ROOT, capture_output=True).returncode == 0


def test_docs_check_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "ref.md"
    stale.write_text("old\n", encoding="utf-8")
    assert docs.main(["--check", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert docs.main([str(stale)]) == 0 and docs.main(["--check", str(stale)]) == 0


def test_config_accepts_the_rows_parameters_only(tmp_path):
    raw = {
        "models": [{"model": "a", "parameters": {"density": 0.5}}, {"model": "b"}],
        "merge_method": "magnitude_linear",
        "base_model": "base",
        "parameters": {"lambda": 0.5},
    }
    cfg = parse_config(raw, tmp_path)
    assert cfg.method_spec is METHOD_SPECS["magnitude_linear"] and cfg.method_spec.default_trim == "magnitude"
    raw["parameters"] = {"consensus": "sum"}
    with pytest.raises(ConfigError, match="unknown key 'consensus' in parameters"):
        parse_config(raw, tmp_path)


@pytest.mark.parametrize("name", [n for n, s in METHOD_SPECS.items() if s.trims])
def test_rescale_default_is_what_the_method_does(name):
    """Unset `rescale` behaves as `rescale=spec.rescale_default` and differs from the other setting."""
    spec = METHOD_SPECS[name]
    fn = METHODS[name]
    deltas = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
    kw = dict(key=jax.random.PRNGKey(3))
    if spec.default_trim is None:
        kw["trim"] = "magnitude"
    got = np.asarray(fn(deltas, [1.0, 0.5], 0.5, **kw))
    same = np.asarray(fn(deltas, [1.0, 0.5], 0.5, rescale=spec.rescale_default, **kw))
    other = np.asarray(fn(deltas, [1.0, 0.5], 0.5, rescale=not spec.rescale_default, **kw))
    np.testing.assert_array_equal(got, same)
    assert not np.allclose(got, other)
