"""The method spec table agrees with the registered functions (signatures, defaults, behaviour)."""

from __future__ import annotations

import inspect

import jax
import numpy as np
import pytest

from sgtv_jax.merge import elect
from sgtv_jax.merge.registry import METHODS
from sgtv_jax.merge.specs import CALLER_ARGS, KINDS, METHOD_SPECS, PER_MODEL_PARAMS, call_args


def _sig(name):
    return inspect.signature(METHODS[name]).parameters


def test_table_lists_exactly_the_registered_methods():
    assert list(METHOD_SPECS) == list(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_declared_parameters_match_signature(name):
    spec, sig = METHOD_SPECS[name], _sig(name)
    declared = {ps.keyword: ps for ps in spec.params}
    assert set(declared) == set(sig) - CALLER_ARGS - {"deltas", "weights"}
    for kw, ps in declared.items():
        assert ps.kind in KINDS
        assert ps.default == sig[kw].default, (name, kw)
        if ps.kind == "choice":
            assert ps.default in ps.choices
        if ps.lo is not None and ps.default is not None:
            assert ps.lo <= ps.default <= ps.hi
    assert spec.trims == ("trim" in sig)
    assert spec.default_trim == (sig["trim"].default if "trim" in sig else None)
    assert spec.consensus == (sig["consensus"].default if "consensus" in sig else None)
    assert spec.normalize_default == (sig["normalize"].default if "normalize" in sig else None)
    assert spec.needs_grams == ("grams" in sig)
    assert spec.needs_base == ("base" in sig)
    if spec.consensus is not None:
        assert spec.param("consensus").choices == elect.CONSENSUS


@pytest.mark.parametrize("name", list(METHODS))
def test_call_args_and_parameters_are_exactly_the_signature(name):
    """What callers read instead of the signature (`call_args`: batch.merge_grid, model.merge) is complete."""
    spec = METHOD_SPECS[name]
    assert set(call_args(spec)) | {ps.keyword for ps in spec.params} == set(_sig(name))
    assert not set(call_args(spec)) & {ps.keyword for ps in spec.params}


def test_per_model_defaults_match_the_functions_that_take_them():
    for ps in PER_MODEL_PARAMS:
        if ps.name in ("density", "weight"):
            continue
        seen = [_sig(n)[ps.name].default for n in METHODS if ps.name in _sig(n)]
        assert seen and set(seen) == {ps.default}, ps.name


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
