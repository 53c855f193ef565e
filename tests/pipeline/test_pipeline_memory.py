"""The memory estimate against a hand computation on a tiny LLaMA (headers only, no weights read)."""

from __future__ import annotations

import json

import pytest

from sgtv_jax.errors import ResourceError
from sgtv_jax.pipeline.config import parse_config
from sgtv_jax.pipeline.memory import (
    CalibrationShape,
    estimate_calibrated,
    estimate_memory,
    llama_shapes,
    refuse_if_too_big,
)
from tests.helpers import tiny_models as H

# tiny LLaMA of tests.helpers.tiny_models: hidden 32, 4 heads (2 KV heads of 8), intermediate 64, 3 blocks
D, A, FF, KV = 32, 4, 64, 16
LINEARS = [(D, D), (KV, D), (KV, D), (D, D), (FF, D), (FF, D), (D, FF)]  # [rows, cols] of q k v o gate up down
BLOCK = sum(r * c for r, c in LINEARS) + 2 * D  # + two RMSNorm weights


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    paths = H.make_family(root, "llama")
    vocab = json.loads((paths["base"] / "config.json").read_text())["vocab_size"]
    return root, paths, vocab


def _no_reads(monkeypatch):
    from convert.safetensors_reader import SafetensorsCheckpoint

    def boom(self, name):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(SafetensorsCheckpoint, "get", boom)


def test_merged_source_by_hand(fam, monkeypatch):
    root, paths, vocab = fam
    _no_reads(monkeypatch)
    est = estimate_memory(parse_config(H.config_dict(paths, root)))  # nsamples 6, seqlen 24, batch 4, T = 2
    T, n, S, b = 2, 6, 24, 4
    want = {
        "activations": 4 * D * (n * S + n * S),
        "attention": 4 * 2 * A * b * S * S,
        "hessians": 4 * sum(c * c for _, c in LINEARS),
        "obs": 4 * max(3 * T * r * c + 3 * c * c for r, c in LINEARS),
        "block": 4 * (T + 1) * BLOCK,
        # untied embedding / head [vocab, hidden]: merged whole (under memory_budget), then joined
        "outer": (12 + 20 * T) * vocab * D + 4 * vocab * D,
    }
    assert {t.name: t.bytes for t in est.terms} == want
    assert est.total == sum(want.values())


def test_per_task_by_hand(fam):
    root, paths, vocab = fam
    raw = H.config_dict(paths, root, hessian_source="per_task")
    raw["models"][1]["calibration"] = {"data": str(root / "calib.txt"), "nsamples": 3, "seqlen": 40}
    est = estimate_memory(parse_config(raw))
    T = 2
    assert est.term("activations").bytes == 4 * D * (6 * 24 + 3 * 40 + max(6 * 24, 3 * 40))
    assert est.term("attention").bytes == 4 * 2 * A * max(4 * 24**2, 3 * 40**2)
    assert est.term("hessians").bytes == 4 * T * sum(c * c for _, c in LINEARS)
    assert est.term("obs").bytes == 4 * max(3 * T * r * c + 3 * T * c * c for r, c in LINEARS)


def test_shapes_alone_equal_the_header_path(fam):
    """The shape-only formula (no checkpoint) gives the header-read estimate, term by term, for both sources."""
    root, paths, vocab = fam
    shapes = llama_shapes(D, FF, vocab, A, kv_heads=2, head_dim=8)
    merged = estimate_memory(parse_config(H.config_dict(paths, root)))
    alone = estimate_calibrated(shapes, tasks=2, sets=[CalibrationShape(6, 24)], batch_size=4)
    assert alone.terms == merged.terms
    raw = H.config_dict(paths, root, hessian_source="per_task")
    raw["models"][1]["calibration"] = {"data": str(root / "calib.txt"), "nsamples": 3, "seqlen": 40}
    per_task = estimate_memory(parse_config(raw))
    alone = estimate_calibrated(
        shapes, tasks=2, sets=[CalibrationShape(6, 24), CalibrationShape(3, 40)], batch_size=4, per_task=True
    )
    assert alone.terms == per_task.terms
    no_data = estimate_calibrated(shapes, tasks=2, sets=[])  # weights only: a block of 3 models, the outer merge
    assert no_data.total == 4 * 3 * BLOCK + (12 + 20 * 2) * vocab * D + 4 * vocab * D


def test_outer_tensor_over_the_budget_counts_one_chunk(fam):
    """An embedding over memory_budget is merged in row chunks: one chunk's rows (at least one row
    of R entries), plus the joined result; the calibration streams' embeddings when they are larger."""
    _, _, vocab = fam
    shapes = llama_shapes(D, FF, vocab, A, kv_heads=2, head_dim=8)
    per = 12 + 20 * 2
    calib = [CalibrationShape(6, 24)]
    small = estimate_calibrated(shapes, tasks=2, sets=calib, budget=1000)  # < one row: one row per chunk
    assert small.term("outer").bytes == D * per + 4 * vocab * D
    mid = estimate_calibrated(shapes, tasks=2, sets=calib, budget=100 * D * per)
    assert mid.term("outer").bytes == 100 * D * per + 4 * vocab * D
    whole = estimate_calibrated(shapes, tasks=2, sets=calib, budget=1000, streamed=False)
    assert whole.term("outer").bytes == vocab * D * per + 4 * vocab * D
    per_task = estimate_calibrated(shapes, tasks=2, sets=calib * 2, per_task=True, budget=1000)
    assert per_task.term("outer").bytes == max(D * per + 4 * vocab * D, 4 * 2 * vocab * D)


def test_data_free_holds_one_tensor_stack(fam, monkeypatch):
    """Data-free merges go tensor by tensor by name: only the largest tensor's stack counts."""
    root, paths, vocab = fam
    raw = H.config_dict(paths, root, trim=None)
    raw.pop("calibration")
    _no_reads(monkeypatch)
    est = estimate_memory(parse_config(raw))
    assert [t.name for t in est.terms if t.bytes] == ["tensor"]
    # the documented whole-tensor working set N (12 + 20 T), T = 2, of the largest tensor (embedding / head)
    assert est.total == (12 + 20 * 2) * max(vocab * D, FF * D)


def test_refusal_names_the_largest_terms_knobs(fam):
    root, paths, _ = fam
    est = estimate_memory(parse_config(H.config_dict(paths, root)))
    refuse_if_too_big(est, est.total)  # fits exactly: fine
    refuse_if_too_big(est, None)  # unknown: never refuse
    with pytest.raises(ResourceError) as e:
        refuse_if_too_big(est, est.total - 1)
    top = est.largest(1)[0]
    assert top.name in str(e.value) and top.knobs[0] in str(e.value) and "--force" in str(e.value)
