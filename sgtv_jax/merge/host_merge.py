"""The data-free merge methods on trimmed task vectors, in NumPy, bit for bit as the JAX methods.

`host_merge(method, trimmed, weights, params)` returns what
`get_method(method)(stack(trimmed), weights, 1.0, trim=None, rescale=False,
**params)` returns (RegMean and linear: without Grams), for float32 task
vectors of any shape: the same IEEE operations in the same order, so the
same bits. On a CPU host this runs several times faster than the eager or
jitted XLA programs for the large, memory-bound arrays of a streamed merge
(`sgtv_jax.merge.streaming`); `tests/test_streaming.py` checks it against
the JAX methods for every method, weight sign and zero sign.

Mirrored, from `methods.generalized_task_arithmetic`, `combine` and `elect`:

    weighted_t = w_t * tau_t                               (float32 weights)
    sum over t = ((0 + a_0) + a_1) + ...                   (XLA's reduction order)
    consensus sum / count: s = where(sum_t weighted_t (or sign) >= 0, 1, -1)
    agree_t = sign(weighted_t) == s
    mixed = sum_t weighted_t * agree_t  [/ where(sum_t w_t agree_t == 0, 1, .)]
    no consensus: mixed = sum_t weighted_t  [/ where(|sum_t w_t| < 1e-8, 1, .)]
    then * lambda (when lambda != 1)

`linear` divides by the float64 sum of the weights (rounded to float32);
`regmean` without Grams is the normalized weighted sum. XLA on CPU divides by
a scalar as a product with its float32 reciprocal, and flushes subnormal
inputs and results of arithmetic to zero; this module does the former and
has no subnormal handling: callers use the JAX methods when a task vector
has entries below `TINY` or the weights are not `moderate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sgtv_jax.merge import _validate
from sgtv_jax.merge.elect import CONSENSUS
from sgtv_jax.merge.specs import method_spec

F32 = np.float32
PARAMS = frozenset({"normalize", "lambda_", "consensus", "alpha"})
"""The method keywords this module mirrors (every data-free method's parameters)."""


def _sum(terms, inplace: bool = True) -> np.ndarray:
    """`((0 + a_0) + a_1) + ...` of an iterable of float32 arrays (the first is the accumulator
    when `inplace`, else a new array)."""
    acc: np.ndarray | None = None
    for a in terms:
        if acc is None:  # 0 + a: turns -0 into +0 as the reduction's init does
            acc = np.add(a, F32(0), out=a if inplace else None)
        else:
            acc += a
    if acc is None:
        raise ValueError("no task vectors to merge")
    return acc


def _weighted(tau: np.ndarray, w: np.float32) -> np.ndarray:
    return np.multiply(tau, w)


TINY = np.float32(2.0**-32)
"""Nonzero task-vector entries below this in magnitude could meet XLA's subnormal flushing.

With every |entry| 0 or >= TINY, weights and lambda `moderate` and at most
256 tasks, no product (>= 2^-48), sum (a multiple of 2^-71), quotient by a
weight sum (<= 2^24) or scaling of the merge is subnormal, so XLA's flushing
never applies and `host_merge` gives its bits.
"""


def moderate(values: Sequence[float]) -> bool:
    """Every nonzero value in [2^-16, 2^16] in magnitude (see `TINY`)."""
    return all(v == 0 or 2.0**-16 <= abs(float(v)) <= 2.0**16 for v in values)


def check_params(
    method: str, weights: Sequence[float], params: Mapping[str, Any] | None, name: str | None = None
) -> None:
    """The checks the JAX method makes on its arguments, with its messages (ValueError)."""
    spec = method_spec(method)
    params = dict(params or {})
    unknown = set(params) - PARAMS
    if unknown:
        raise ValueError(f"host_merge does not mirror the parameters {sorted(unknown)} of method {method!r}")
    w = _validate.per_task(list(weights), len(weights), "weights", name)
    where = f" for tensor {name!r}" if name else ""
    if spec.consensus and params.get("consensus", spec.consensus) not in CONSENSUS:
        raise ValueError(f"unknown consensus {params['consensus']!r}; known: {', '.join(CONSENSUS)} or None")
    if (method == "linear" and params.get("normalize", True)) or method == "regmean":
        if abs(sum(w)) < 1e-12:
            raise ValueError(f"{method} needs weights that do not sum to 0, got {list(w)}{where}")
    if method == "regmean" and not 0.0 <= float(params.get("alpha", 0.9)) <= 1.0:
        raise ValueError(f"regmean alpha must be in [0, 1], got {params['alpha']!r}")


def host_merge(
    method: str, trimmed: Sequence[np.ndarray], weights: Sequence[float], params: Mapping[str, Any] | None = None
) -> np.ndarray:
    """The merged task vector of the trimmed float32 task vectors `trimmed[t]` (same shape each).

    `params`: the method's keywords (`PARAMS`); values are assumed valid (the
    JAX method checks them). The arrays in `trimmed` are not modified.
    """
    spec = method_spec(method)
    params = dict(params or {})
    unknown = set(params) - PARAMS
    if unknown:
        raise ValueError(f"host_merge does not mirror the parameters {sorted(unknown)} of method {method!r}")
    w = [F32(x) for x in weights]
    if method == "linear":
        mixed = _sum(_weighted(tau, wt) for tau, wt in zip(trimmed, w))
        if params.get("normalize", True):
            mixed *= _reciprocal(F32(sum(float(x) for x in weights)))
        return mixed
    if method == "regmean":  # without Grams: the normalized weighted sum
        mixed = _sum(_weighted(tau, wt) for tau, wt in zip(trimmed, w))
        return _normalized(mixed, w)
    consensus = params.get("consensus", spec.consensus) if spec.consensus else None
    normalize = params.get("normalize", spec.normalize_default)
    lambda_ = params.get("lambda_", 1.0)
    weighted = [_weighted(tau, wt) for tau, wt in zip(trimmed, w)]
    if consensus is None:
        mixed = _sum(weighted)
        if normalize:
            mixed = _normalized(mixed, w)
    else:
        if consensus == "sum":
            total = _sum(weighted, inplace=False)
        elif consensus == "count":
            total = _sum(np.sign(a) for a in weighted)
        else:
            raise ValueError(f"unknown consensus {consensus!r}")
        elected = np.where(total >= 0, F32(1), F32(-1))
        del total
        agree = [np.sign(a) == elected for a in weighted]
        del elected
        # disjoint merge: sum_t (tau_t * w_t) * m_t, divided by sum_t w_t * m_t
        mixed = _sum(np.multiply(a, m, out=a) for a, m in zip(weighted, agree))
        if normalize:
            divisor = _sum(np.multiply(wt, m, dtype=F32) for wt, m in zip(w, agree))
            divisor[divisor == 0] = 1
            mixed /= divisor
    if lambda_ != 1.0:
        mixed *= F32(lambda_)
    return mixed


def _reciprocal(x: np.float32) -> np.float32:
    """XLA on CPU divides an array by a scalar as a product with the float32 reciprocal."""
    return F32(1) / x


def _normalized(mixed: np.ndarray, w: list[np.float32]) -> np.ndarray:
    """`mixed / where(|sum_t w_t| < 1e-8, 1, sum_t w_t)`, the sum in float32 as XLA adds it."""
    divisor = F32(0)
    for wt in w:
        divisor = F32(divisor + wt)
    if abs(divisor) >= 1e-8:
        mixed *= _reciprocal(divisor)
    return mixed
