"""`convert.chunked.ahead`: a stream of tensors produced in a worker thread while the caller writes.

The items must come out in order and unchanged (whole arrays and row chunks),
the worker may run only a bounded number of items ahead, an exception in the
worker must reach the caller where its item would have come (the very same
object, after every item before it), and an error on the writing side must
stop the worker and close the stream. Through `export_hf` a failure in the
middle leaves no output. Also `count_nonfinite`, the check on that path,
against `np.isfinite`.
"""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import pytest

from convert import ConvertError, export_hf
from convert.chunked import ChunkedTensor, ahead
from convert.dtypes import FINITE_BLOCK, count_nonfinite

RNG = np.random.default_rng(0)
WHOLE = RNG.standard_normal((3, 5)).astype(np.float32)
PARTS = [RNG.standard_normal((r, 4)).astype(np.float32) for r in (2, 3, 1)]


def _stream(fail_at: int | None = None):
    """('w', WHOLE), ('c', chunks of PARTS), ('x', WHOLE * 2); `fail_at`: raise before that chunk of 'c'."""
    yield "w", WHOLE

    def chunks():
        for i, p in enumerate(PARTS):
            if i == fail_at:
                raise ValueError("chunk broke")
            yield p

    yield "c", ChunkedTensor((6, 4), np.float32, chunks())
    yield "x", WHOLE * 2


def _read(stream) -> list[tuple[str, np.ndarray]]:
    return [(n, np.concatenate(list(v)) if isinstance(v, ChunkedTensor) else v) for n, v in stream]


def test_items_come_in_order_and_unchanged():
    got = _read(ahead(_stream(), depth=1))
    want = _read(_stream())
    assert [n for n, _ in got] == ["w", "c", "x"]
    for (n, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), n


def test_worker_runs_at_most_depth_items_ahead():
    log: list[str] = []

    def slow_stream():
        for i in range(8):
            log.append(f"made {i}")
            yield str(i), np.full(3, i, np.float32)

    depth = 2
    it = iter(ahead(slow_stream(), depth=depth))
    name, _ = next(it)
    assert name == "0"
    time.sleep(0.3)  # let the worker run as far as the queue allows
    # taken: 1; queued: at most depth; the one blocked on `put`: 1
    assert len(log) <= 1 + depth + 1
    assert [n for n, _ in it] == [str(i) for i in range(1, 8)]


def test_worker_error_reaches_the_caller_in_place():
    seen, err = [], None
    stream = ahead(_stream(fail_at=2), depth=4)
    try:
        for name, value in stream:
            for c in value if isinstance(value, ChunkedTensor) else (value,):
                seen.append((name, c.shape))
    except ValueError as e:
        err = e
    assert str(err) == "chunk broke"
    # everything before the failing chunk was delivered, nothing after it
    assert seen == [("w", (3, 5)), ("c", (2, 4)), ("c", (3, 4))]
    assert not stream._thread.is_alive()


def test_worker_error_is_the_same_object():
    boom = KeyError("tensor 'z' of models[1]")

    def stream():
        yield "a", WHOLE
        raise boom

    it = iter(ahead(stream()))
    assert next(it)[0] == "a"
    with pytest.raises(KeyError) as info:
        next(it)
    assert info.value is boom


def test_writer_error_stops_the_worker_and_closes_the_stream():
    closed: list[bool] = []

    def endless():
        try:
            i = 0
            while True:
                i += 1
                yield str(i), np.zeros(2, np.float32)
        finally:
            closed.append(True)

    with pytest.raises(RuntimeError, match="disk full"):
        with ahead(endless(), depth=2) as stream:
            for name, _ in stream:
                if name == "3":
                    raise RuntimeError("disk full")
    assert closed == [True]
    assert not stream._thread.is_alive()


def test_export_error_mid_stream_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ValueError, match="chunk broke"):
        with ahead(_stream(fail_at=1)) as stream:
            export_hf(stream, out, config=cfg, dtype="fp32", max_shard_size="64B")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    # the same stream without the failure writes all three tensors
    with ahead(_stream()) as stream:
        export_hf(stream, out, config=cfg, dtype="fp32", max_shard_size="64B")
    assert len(list(out.glob("*.safetensors"))) == 3


def test_export_refuses_an_overflow_found_in_a_chunk(tmp_path):
    big = np.full((2, 4), 3.4e38, np.float32)  # rounds to inf in bfloat16

    def stream():
        yield "a", WHOLE
        yield "b", ChunkedTensor((4, 4), np.float32, iter([PARTS[0], big]))

    with pytest.raises(ConvertError, match="'b' has 8 non-finite"):
        with ahead(stream()) as s:
            export_hf(s, tmp_path / "out", config={"model_type": "llama"}, dtype="bf16")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 7, FINITE_BLOCK - 1, FINITE_BLOCK, 3 * FINITE_BLOCK + 5])
def test_count_nonfinite_matches_isfinite(dtype, n):
    a = RNG.standard_normal(n).astype(dtype)
    if n >= 4:
        at = RNG.choice(n, 4, replace=False)
        a[at] = np.array([np.nan, np.inf, -np.inf, np.nan], np.float32).astype(dtype)
        a[-1] = np.inf  # the last entry of the last (ragged) block
    want = int(np.count_nonzero(~np.isfinite(a)))
    assert count_nonfinite(a) == want
    assert count_nonfinite(a.reshape(-1, 1)[::2]) == int(np.count_nonzero(~np.isfinite(a[::2])))  # a strided view
    top = ml_dtypes.finfo(dtype).max  # the largest finite values have all but the lowest exponent bit set
    assert count_nonfinite(np.array([top, -top], dtype)) == 0


def test_count_nonfinite_ignores_integers():
    assert count_nonfinite(np.array([0, 2**31 - 1], np.int32)) == 0
    assert count_nonfinite(np.array([np.nan], np.float32).reshape(())) == 1
