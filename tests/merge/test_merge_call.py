"""The plan interpreter (`sgtv_jax.merge.call`): what a plan resolves to, against hand-written expectations."""

from __future__ import annotations

import numpy as np
import pytest

from sgtv_jax.errors import NumericsError
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.call import PlanError, interpret
from sgtv_jax.merge.keys import tensor_key
from sgtv_jax.merge.plan import TensorPlan
from sgtv_jax.pipeline.config import ConfigError
from sgtv_jax.pipeline.driver import translated


def test_ties_resolves_to_magnitude_without_rescale_and_the_declared_defaults():
    call = interpret(TensorPlan("ties", "w", (1.0, 0.5), (0.3, 0.3), seed=7), ndim=2)
    assert (call.stage, call.trim, call.rescale, call.count) == ("trim_then_merge", "magnitude", False, "round")
    assert (call.gamma, call.epsilon) == (trim_lib.GAMMA, trim_lib.EPSILON) == (0.01, 0.15)
    np.testing.assert_array_equal(np.asarray(call.key), np.asarray(tensor_key(7, "w")))


def test_dare_rescales_and_the_trim_options_leave_the_method_keywords():
    plan = TensorPlan(
        "dare_ties", "w", (1.0,), (0.5,), params={"count": "floor", "normalize": False}, gamma=(0.2,), epsilon=(0.1,)
    )
    call = interpret(plan, ndim=2)
    assert (call.trim, call.rescale, call.count) == ("random", True, "floor")
    assert call.method_kwargs() == {"normalize": False}
    assert (call.gamma, call.epsilon) == ((0.2,), (0.1,))
    # an explicit rescale wins over the method's rule; a calibration trim does not rescale by default
    assert interpret(plan._replace(params={"rescale": False}), ndim=2).rescale is False
    assert interpret(plan._replace(trim="sparsegpt"), ndim=2).rescale is False


def test_stages_and_statistics():
    lin = interpret(TensorPlan("linear", "w", (1.0, 1.0), (1.0, 1.0)), ndim=2)
    assert (lin.stage, lin.trim, lin.rescale) == ("untrimmed", None, False)
    calib = trim_lib.Calibration(hessian=np.eye(3, dtype=np.float32))
    reg = interpret(TensorPlan("regmean", "w", (1.0,), (1.0,)), ndim=2, calib=calib)
    assert reg.grams and not interpret(TensorPlan("regmean", "w", (1.0,), (1.0,)), ndim=1, calib=calib).grams
    sparse = interpret(TensorPlan("regmean_sparse", "w", (1.0,), (0.5,), trim="sparsegpt"), ndim=2, calib=calib)
    assert sparse.stage == "merge_then_trim" and sparse.grams


@pytest.mark.parametrize(
    "plan,match",
    [
        (TensorPlan("task_arithmetic", "blk.0", (1.0,), (0.5,)), "'blk.0'.*does not trim by itself"),
        (TensorPlan("ties", "w", (1.0,), (0.5,), params={"count": "ceil"}), "unknown count rule 'ceil'"),
    ],
)
def test_plans_that_cannot_run(plan, match):
    with pytest.raises(PlanError, match=match):
        interpret(plan, ndim=2)


def test_translated_names_the_tensor():
    plan = TensorPlan("ties", "blk.3.w", (1.0,), (0.5,))
    with pytest.raises(ConfigError, match="unknown count"), translated(plan):
        raise PlanError("unknown count rule")
    with pytest.raises(NumericsError, match=r"merging tensor 'blk.3.w' \(ties, trim default\): bad"), translated(plan):
        raise ValueError("bad")
    with pytest.raises(KeyError), translated(plan):  # not the merge library's checks: as it is
        raise KeyError("x")
