"""Chunked random draws and the row-chunked merge, against independent references (selection: test_select.py).

References: `jax.random` on the whole
array (block draws), float64 NumPy TIES / breadcrumbs written here, and
`merge_planned` on the whole stack (the row-chunked merge must give the same
bits for every chunk size).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sgtv_jax.merge import blockrng, chunk_select, streaming
from sgtv_jax.merge.call import interpret
from sgtv_jax.merge.keys import task_keys, tensor_key
from sgtv_jax.merge.plan import PlanError, TensorPlan, merge_planned
from sgtv_jax.merge.streaming import StreamStats, bytes_per_entry, chunk_rows, merge_rows

BF16 = np.dtype(ml_dtypes.bfloat16)


# --------------------------------------------------------------------------- block draws


@pytest.mark.parametrize("shape", [(7,), (5, 3), (33, 17), (4, 3, 5)])
def test_block_draws_equal_whole_draws(shape):
    key = task_keys(tensor_key(3, "model.embed_tokens.weight"), 2)[1]
    whole_u = np.asarray(jax.random.uniform(key, shape, jnp.float32))
    whole_b = np.asarray(jax.random.bernoulli(key, 0.37, shape))
    cols = math.prod(shape[1:])
    for r0 in range(shape[0]):
        for r1 in (r0 + 1, shape[0]):
            part = (r1 - r0,) + shape[1:]
            u = np.asarray(blockrng.uniform_block(key, part, np.float32, r0 * cols))
            np.testing.assert_array_equal(u.view(np.uint32), whole_u[r0:r1].view(np.uint32))
            np.testing.assert_array_equal(
                np.asarray(blockrng.bernoulli_block(key, 0.37, part, r0 * cols)), whole_b[r0:r1]
            )


def test_block_draws_float64():
    key = jax.random.PRNGKey(11)
    with jax.enable_x64(True):
        whole = np.asarray(jax.random.uniform(key, (6, 5), jnp.float64))
        part = np.asarray(blockrng.uniform_block(key, (2, 5), np.float64, 15))
    np.testing.assert_array_equal(part, whole[3:5])


def test_block_draws_carry_past_two_to_the_32():
    # one draw across the 2^32 counter boundary equals its two halves drawn apart
    key = jax.random.PRNGKey(2)
    edge = 1 << 32
    across = np.asarray(blockrng.uniform_block(key, (8,), np.float32, edge - 3))
    lo = np.asarray(blockrng.uniform_block(key, (3,), np.float32, edge - 3))
    hi = np.asarray(blockrng.uniform_block(key, (5,), np.float32, edge))
    np.testing.assert_array_equal(across, np.concatenate([lo, hi]))
    assert not np.array_equal(hi, np.asarray(blockrng.uniform_block(key, (5,), np.float32, 0)))


# --------------------------------------------------------------------------- row-chunked merge


def family(seed: int, shape: tuple[int, ...], tasks: int, dtype) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base and fine-tunes whose task vectors have many exact ties and zeros."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(dtype)
    models = []
    for _ in range(tasks):
        d = np.round(rng.standard_normal(shape) * 2) / 8
        d[rng.random(shape) < 0.3] = 0.0
        models.append((base.astype(np.float32) + d).astype(dtype))
    return base, models


def reader(a: np.ndarray):
    return lambda r0, r1: a[r0:r1]


def run_rows(plan, base, models, rows_per_chunk, out_dtype, stats=None, transpose=False):
    per_row = math.prod(base.shape[1:]) * bytes_per_entry(len(models))
    chunks = list(
        merge_rows(
            plan,
            reader(base),
            [reader(m) for m in models],
            base.shape,
            out_dtype=out_dtype,
            budget_bytes=rows_per_chunk * per_row,
            stats=stats,
            transpose=transpose,
        )
    )
    return np.concatenate(chunks) if base.ndim else chunks[0]


def whole_reference(plan, base, models, out_dtype, transpose=False):
    """The pipeline's result: base + merge_planned(float32 task vectors), cast; the base when unchanged.

    `transpose`: the stack is merged as `[T, cols, rows]` and the result transposed back.
    """
    b = base.astype(np.float32)
    d = np.stack([m.astype(np.float32) - b for m in models])
    if not np.any(d):
        return b.astype(out_dtype)
    merged, _, _ = merge_planned(plan, jnp.asarray(d.transpose(0, 2, 1) if transpose else d))
    merged = np.asarray(merged, np.float32)
    return (b + (merged.T if transpose else merged)).astype(out_dtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}"))


CASES = [
    ("ties", None, {}),
    ("ties", "breadcrumbs", {}),
    ("ties", "random", {}),
    ("dare_ties", None, {}),
    ("dare_linear", None, {}),
    ("task_arithmetic", None, {}),
    ("task_arithmetic", "magnitude", {"rescale": True}),
    ("breadcrumbs", None, {}),
    ("breadcrumbs_ties", None, {}),
    ("della", None, {}),
    ("della_linear", None, {"lambda_": 0.7}),
    ("magnitude_linear", None, {}),  # the row added by following CONTRIBUTING.md
    ("linear", None, {}),
    ("regmean", None, {}),
]


def plan_for(method, trim, params, tasks=3, densities=(0.5, 0.3, 0.75)):
    untrimmed = method in ("linear", "regmean") or (method == "task_arithmetic" and trim is None)
    return TensorPlan(
        method,
        "model.layers.0.mlp.up_proj.weight",
        weights=(1.0, 0.5, 2.0)[:tasks],
        densities=(1.0,) * tasks if untrimmed else densities[:tasks],
        trim=trim,
        params=params,
        seed=5,
        gamma=(0.1, 0.05, 0.2)[:tasks] if "breadcrumbs" in (method, trim) else None,
    )


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("method,trim,params", CASES)
def test_chunked_merge_equals_whole_merge(method, trim, params, dtype):
    base, models = family(0, (13, 6), 3, dtype)
    plan = plan_for(method, trim, params)
    want = whole_reference(plan, base, models, BF16)
    for rows in (1, 2, 3, 5, 12, 13):  # chunks of 1 row, ragged last chunks, one chunk
        stats = StreamStats()
        same_bits(run_rows(plan, base, models, rows, BF16, stats), want)
        assert stats.chunks == -(-13 // rows) and stats.rows_per_chunk == rows


@pytest.mark.parametrize("method,trim,params", CASES)
def test_transposed_chunked_merge_equals_whole_merge(method, trim, params):
    # the pipeline merges embeddings as [hidden, vocab]: ties, draws and rows in that order
    base, models = family(7, (14, 5), 3, BF16)
    plan = plan_for(method, trim, params)
    want = whole_reference(plan, base, models, BF16, transpose=True)
    for rows in (1, 3, 14):
        same_bits(run_rows(plan, base, models, rows, BF16, transpose=True), want)


def test_transposed_ties_take_no_extra_pass():
    base, models = family(8, (12, 4), 2, BF16)
    plan = plan_for("ties", None, {}, tasks=2)
    stats = StreamStats()
    same_bits(
        run_rows(plan, base, models, 5, BF16, stats, transpose=True),
        whole_reference(plan, base, models, BF16, transpose=True),
    )
    assert stats.passes == 2  # counting (ties placed from the gathered positions), merge
    # and the transposed order matters: the untransposed merge differs here
    assert not np.array_equal(
        whole_reference(plan, base, models, BF16).view(np.uint16),
        whole_reference(plan, base, models, BF16, transpose=True).view(np.uint16),
    )


@pytest.mark.parametrize("method,trim", [("ties", None), ("dare_ties", None), ("breadcrumbs", None), ("della", None)])
def test_chunked_merge_3d_tensor_and_float32_output(method, trim):
    base, models = family(1, (9, 2, 5), 2, np.float32)
    plan = plan_for(method, trim, {}, tasks=2)
    want = whole_reference(plan, base, models, np.float32)
    for rows in (1, 4, 9):
        same_bits(run_rows(plan, base, models, rows, np.float32), want)


def ref_ties64(base, models, densities, weights):
    """float64 TIES: top-k |d| per task (earlier entry wins a tie), sum election, disjoint mean."""
    b = base.astype(np.float64)
    trimmed = []
    for m, dens in zip(models, densities):
        d = (m.astype(np.float32) - base.astype(np.float32)).astype(np.float64).reshape(-1)
        keep = np.zeros(d.size, bool)
        keep[np.argsort(-np.abs(d), kind="stable")[: int(round(dens * d.size))]] = True
        trimmed.append(np.where(keep, d, 0.0))
    x = np.stack(trimmed) * np.asarray(weights)[:, None]
    sign = np.where(x.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(x) == sign
    den = (agree * np.asarray(weights)[:, None]).sum(0)
    merged = (x * agree).sum(0) / np.where(den == 0, 1, den)
    return b + merged.reshape(base.shape)


def test_chunked_ties_matches_float64_reference():
    base, models = family(2, (11, 7), 3, np.float32)
    plan = TensorPlan("ties", "w", weights=(1.0, 0.5, 2.0), densities=(0.5, 0.3, 0.75))
    want = ref_ties64(base, models, plan.densities, plan.weights)
    for rows in (1, 3, 11):
        got = run_rows(plan, base, models, rows, np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_chunked_breadcrumbs_matches_float64_reference():
    base, models = family(3, (10, 9), 2, np.float32)
    dens, gam = (0.4, 0.6), (0.1, 0.25)
    plan = TensorPlan("breadcrumbs", "w", weights=(1.0, -0.5), densities=dens, gamma=gam)
    want = base.astype(np.float64).reshape(-1).copy()
    for m, w, de, g in zip(models, plan.weights, dens, gam):
        d = (m.astype(np.float32) - base.astype(np.float32)).astype(np.float64).reshape(-1)
        n, k = d.size, int(round(de * d.size))
        n_top = min(int(round(g * n)), n - k)
        keep = np.zeros(n, bool)
        keep[np.argsort(-np.abs(d), kind="stable")[n_top : n_top + k]] = True
        want += w * np.where(keep, d, 0.0)
    for rows in (1, 4, 10):
        got = run_rows(plan, base, models, rows, np.float32)
        np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-6, atol=1e-6)


def test_ties_all_at_the_threshold_keeps_earliest():
    # every |d| equal: the top k are exactly the first k entries in row-major order
    base = np.zeros((6, 4), np.float32)
    models = [np.full((6, 4), 0.25, np.float32), np.full((6, 4), -0.25, np.float32)]
    plan = TensorPlan("ties", "w", weights=(1.0, 1.0), densities=(0.5, 0.25))
    got = run_rows(plan, base, models, 1, np.float32).reshape(-1)
    # first 6 entries: both kept (+0.25 / -0.25 tie elects +): +0.25; next 6: only task 0: +0.25; rest 0
    np.testing.assert_array_equal(got, np.r_[np.full(12, 0.25), np.zeros(12)].astype(np.float32))


def test_unchanged_tensor_returns_base_bits():
    base = np.array([[-0.0, 1.5], [2.0, -0.0], [0.0, 3.0]], np.float32)
    for method in ("ties", "dare_ties", "task_arithmetic"):
        plan = plan_for(method, None, {}, tasks=2)
        stats = StreamStats()
        got = run_rows(plan, base, [base.copy(), base.copy()], 1, np.float32, stats)
        same_bits(got, base)  # -0.0 stays -0.0 (base + 0 would give +0.0)
        assert stats.unchanged


def test_one_dimensional_tensor_is_one_chunk():
    base, models = family(4, (17,), 2, BF16)
    plan = plan_for("della", None, {}, tasks=2)
    stats = StreamStats()
    same_bits(run_rows(plan, base, models, 1, BF16, stats), whole_reference(plan, base, models, BF16))
    assert stats.chunks == 1


def test_reads_never_exceed_a_chunk_and_selection_uses_two_passes():
    base, models = family(5, (40, 8), 2, BF16)
    calls: list[tuple[int, int]] = []

    def counted(a):
        def read(r0, r1):
            calls.append((r0, r1))
            return a[r0:r1]

        return read

    plan = plan_for("ties", None, {}, tasks=2)
    stats = StreamStats()
    per_row = 8 * bytes_per_entry(2)
    out = np.concatenate(
        list(
            merge_rows(
                plan,
                counted(base),
                [counted(m) for m in models],
                base.shape,
                out_dtype=BF16,
                budget_bytes=7 * per_row,
                stats=stats,
            )
        )
    )
    same_bits(out, whole_reference(plan, base, models, BF16))
    assert max(r1 - r0 for r0, r1 in calls) == 7 == stats.rows_per_chunk
    assert stats.passes == 2  # counting, merge
    sampled = [c for c in calls if c[1] - c[0] == 1]  # the bracket's sample: every row (40 <= SAMPLE_ROWS), once
    assert sorted(set(sampled)) == [(r, r + 1) for r in range(40)] and len(sampled) == 3 * 40
    assert len(calls) - len(sampled) == 2 * 3 * stats.chunks  # base + 2 models per chunk per pass
    assert stats.kept == pytest.approx([0.5, 0.3], abs=1 / 320)


def test_chunk_rows_fits_the_budget():
    assert chunk_rows((1000, 64), 2, 64 * bytes_per_entry(2) * 10) == 10
    assert chunk_rows((1000, 64), 2, 1) == 1
    assert chunk_rows((1000, 64), 2, 1 << 40) == 1000
    assert chunk_rows((50,), 3, 1) == 50


def test_errors_name_the_tensor_and_model():
    base, models = family(6, (8, 4), 2, np.float32)
    models[1][5, 2] = np.nan
    plan = plan_for("ties", None, {}, tasks=2)
    with pytest.raises(ValueError, match=r"up_proj.*model 1 \(1 entries\)"):
        run_rows(plan, base, models, 2, np.float32)
    with pytest.raises(ValueError, match="model 0 rows"):
        list(
            merge_rows(
                plan,
                reader(base),
                [lambda r0, r1: base[r0:r1, :3], reader(base)],
                base.shape,
                out_dtype=np.float32,
                budget_bytes=1,
            )
        )
    with pytest.raises(PlanError, match="calibration"):
        merge_rows(plan._replace(trim="sparsegpt"), reader(base), [reader(base)] * 2, base.shape, out_dtype=np.float32)
    with pytest.raises(PlanError, match="does not trim"):
        merge_rows(
            plan_for("task_arithmetic", None, {}, tasks=2)._replace(densities=(0.5, 0.5)),
            reader(base),
            [reader(base)] * 2,
            base.shape,
            out_dtype=np.float32,
        )


# --------------------------------------------------------------------------- XLA arithmetic


def test_tiny_task_vectors_follow_xla_arithmetic():
    # subnormal task-vector entries (XLA flushes them) and tiny ones: chunks merge with the JAX method's bits
    base, models = family(10, (8, 6), 2, np.float32)
    base[2, :3] = 0.0  # the output there is the merged value itself
    models[0][2, :3] = np.float32(1e-39)  # a subnormal task-vector entry (XLA: 1e-39 * w -> 0)
    models[1][2, :3] = 0.0
    models[1][3, 1] = base[3, 1] + np.float32(3e-11)
    for method in ("ties", "task_arithmetic", "linear"):
        plan = plan_for(method, None, {}, tasks=2)
        for rows in (1, 3, 8):
            same_bits(run_rows(plan, base, models, rows, np.float32), whole_reference(plan, base, models, np.float32))


@pytest.mark.parametrize("kind", ["distinct", "few values", "mostly zero", "two values"])
def test_bracket_cut_takes_the_m_smallest(kind):
    from sgtv_jax.select import bracket_cut

    rng = np.random.default_rng(11)
    n = 300_000
    keys = {
        "distinct": rng.permutation(n).astype(np.uint32) * np.uint32(7),
        "few values": rng.integers(0, 40, n).astype(np.uint32) << np.uint32(20),
        "mostly zero": np.where(rng.random(n) < 0.7, 0x7FFFFFFF, rng.integers(0, 1 << 30, n)).astype(np.uint32),
        "two values": np.where(rng.random(n) < 0.5, 5, 9).astype(np.uint32),
    }[kind]
    ordered = np.sort(keys)
    for m in (1, 1000, n // 3, n // 2, n - 1, n):
        cut = bracket_cut(keys, m, int(chunk_select.KEY_MAX))
        assert cut is not None  # a uniform sample brackets these ranks
        below = int(np.count_nonzero(keys < cut.key))
        assert below + cut.ties == m
        if cut.ties:  # some entries equal to the m-th smallest key are taken, not all of them
            assert cut.key == ordered[m - 1] and cut.ties < np.count_nonzero(keys == cut.key)


def test_large_tensor_in_memory_equals_whole_merge():
    # above the bracket's size threshold; many ties and zeros
    base, models = family(12, (700, 500), 2, BF16)
    for method, trim in (("ties", None), ("breadcrumbs_ties", None)):
        plan = plan_for(method, trim, {}, tasks=2)
        stats = StreamStats()
        same_bits(run_rows(plan, base, models, 700, BF16, stats), whole_reference(plan, base, models, BF16))
        assert stats.chunks == 1 and stats.passes == 1


def missed_bracket(sample, q):
    """A bracket that holds no key: every cut falls back to the histogram passes."""
    return (0, 0)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("method,trim", [("ties", None), ("breadcrumbs_ties", None)])
def test_histogram_fallback_equals_whole_merge(monkeypatch, method, trim, transpose):
    monkeypatch.setattr(chunk_select, "row_bracket", missed_bracket)
    base, models = family(13, (12, 5), 2, BF16)
    plan = plan_for(method, trim, {}, tasks=2)
    stats = StreamStats()
    same_bits(
        run_rows(plan, base, models, 5, BF16, stats, transpose=transpose),
        whole_reference(plan, base, models, BF16, transpose=transpose),
    )
    # counting (missed), high digit, low digit, (ties per column when transposed), merge
    assert stats.passes == 4 + transpose


def test_unchanged_tensor_stops_after_the_pass_that_finds_no_change(monkeypatch):
    monkeypatch.setattr(chunk_select, "row_bracket", missed_bracket)  # else the digit passes would run
    base, _ = family(13, (12, 5), 2, BF16)
    plan = plan_for("ties", None, {}, tasks=2)
    stats = StreamStats()
    same_bits(run_rows(plan, base, [base.copy(), base.copy()], 5, BF16, stats), base)
    assert stats.unchanged and stats.passes == 2  # counting (finds no change), the base written


@pytest.mark.parametrize("kind", ["distinct", "few values", "rows of different scale", "mostly zero"])
def test_counted_cut_takes_the_m_smallest_in_merge_order(kind):
    # the counting pass's cut against a sort oracle: the m largest |d| by a stable sort of the merge order
    rng = np.random.default_rng(14)
    rows, cols = 300, 64
    d = {
        "distinct": rng.standard_normal((rows, cols)),
        "few values": rng.integers(-3, 4, (rows, cols)) / 4,
        "rows of different scale": rng.standard_normal((rows, cols)) * np.logspace(-3, 1, rows)[:, None],
        "mostly zero": np.where(rng.random((rows, cols)) < 0.8, 0.0, rng.standard_normal((rows, cols))),
    }[kind].astype(np.float32)
    base = np.zeros((rows, cols), np.float32)
    for transpose in (False, True):
        for dens in (0.01, 0.3, 0.5, 0.97):
            plan = TensorPlan("ties", "w", weights=(1.0,), densities=(dens,))
            chunked = streaming._Chunked(
                interpret(plan, ndim=1),
                (dens,),
                chunk_select.Source("w", reader(base), [reader(d)], (rows, cols)),
                37,
                transpose,
                StreamStats(),
            )
            m = chunked.ranks[0][0]
            counted = chunked._counted_cuts([(0, m)])
            assert (0, m) in counted.cuts  # the sampled bracket holds the m-th key here
            cut = counted.cuts[(0, m)]
            order = d.T.reshape(-1) if transpose else d.reshape(-1)
            want = np.zeros(order.size, bool)
            want[np.argsort(-np.abs(order), kind="stable")[:m]] = True
            keys = chunk_select.KEY_MAX - np.abs(order).view(np.uint32)
            got = keys < np.uint32(cut.key)
            eq = np.flatnonzero(keys == np.uint32(cut.key))
            if cut.ties and transpose:
                col_of = eq // rows
                take = eq[(col_of < cut.col) | ((col_of == cut.col) & (np.cumsum(col_of == cut.col) <= cut.col_ties))]
                got[take] = True
            elif cut.ties:
                got[eq[: cut.ties]] = True
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda_": 1.3}), ("linear", {})])
def test_weighted_sums_at_real_sizes_agree_across_chunkings_and_with_the_whole_merge_to_rounding(method, params):
    """What holds beyond the tiny shapes above: every chunking gives the same bits (one program per
    chunk shape, entry by entry), and the compiled weighted sum (XLA fuses multiply and add) stays
    within float32 rounding of `merge_planned` run op by op."""
    base, models = family(0, (128, 1024), 2, np.float32)
    plan = TensorPlan(method, "w", weights=(1.0, 0.7), densities=(1.0, 1.0), params=params, seed=5)
    outs = [run_rows(plan, base, models, rows, np.float32) for rows in (1, 7, 128)]
    for out in outs[1:]:
        same_bits(out, outs[0])
    want = whole_reference(plan, base, models, np.float32)
    taus = [m.astype(np.float64) - base for m in models]
    scale = np.abs(base) + sum(w * np.abs(t) for w, t in zip(plan.weights, taus))
    bound = 4 * np.finfo(np.float32).eps * scale * max(1.0, params.get("lambda_", 1.0))
    assert np.all(np.abs(outs[0].astype(np.float64) - want) <= bound)
