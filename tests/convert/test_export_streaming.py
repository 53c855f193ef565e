"""Export of tensors given as row chunks: the same files, byte for byte, without holding a tensor whole."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import convert.export as export_mod  # noqa: E402
from convert import ConvertError, export_hf, open_checkpoint  # noqa: E402
from convert.chunked import ChunkedTensor, rows_of  # noqa: E402
from convert.safetensors_writer import StreamingSafetensorsWriter  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def base_bf16(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("base") / "tiny"
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size="30KB")
    return path


def files(directory: Path) -> dict[str, bytes]:
    """Every tensor file and the index, by name, as raw bytes."""
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.suffix == ".safetensors" or p.name.endswith(".index.json")
    }


def chunks_of(a: np.ndarray, rows: int) -> ChunkedTensor:
    return ChunkedTensor(a.shape, a.dtype, (a[r0 : r0 + rows] for r0 in range(0, a.shape[0], rows)))


def merged_tensors(base) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        n: (base.get(n).astype(np.float32) + rng.standard_normal(base.shape(n)).astype(np.float32) * 0.01)
        for n in base.names()
        if "mlp" in n or "embed" in n
    }


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_chunked_values_write_the_same_bytes(base_bf16, tmp_path, rows):
    base = open_checkpoint(base_bf16)
    merged = merged_tensors(base)
    whole = export_hf(merged, tmp_path / "whole", base=base, dtype="bf16", max_shard_size="40KB")
    chunked = export_hf(
        {n: chunks_of(a, rows) for n, a in merged.items()},
        tmp_path / "chunked",
        base=base,
        dtype="bf16",
        max_shard_size="40KB",
    )
    assert files(whole) == files(chunked) and len(files(whole)) > 3
    model = transformers.AutoModelForCausalLM.from_pretrained(chunked, dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(
        model.state_dict()[name].numpy(), merged[name].astype(ml_dtypes.bfloat16).astype(np.float32)
    )


def test_unchanged_base_tensors_copied_in_row_chunks(base_bf16, tmp_path, monkeypatch):
    base = open_checkpoint(base_bf16)
    whole = export_hf({}, tmp_path / "whole", base=base, dtype="bf16", max_shard_size="40KB")
    reads: list[tuple[str, int, int]] = []
    get_rows = type(base).get_rows

    def counted(self, name, r0, r1):
        reads.append((name, r0, r1))
        return get_rows(self, name, r0, r1)

    monkeypatch.setattr(type(base), "get_rows", counted)
    monkeypatch.setattr(export_mod, "COPY_CHUNK_BYTES", 1000)
    chunked = export_hf({}, tmp_path / "chunked", base=base, dtype="bf16", max_shard_size="40KB")
    assert files(whole) == files(chunked)
    embed = [(r0, r1) for n, r0, r1 in reads if n == "model.embed_tokens.weight"]
    assert embed[0] == (0, 7) and embed[-1][1] == 160 and len(embed) == -(-160 // 7)  # 1000 // (64 * 2) rows


def test_get_rows_reads_the_rows(base_bf16):
    base = open_checkpoint(base_bf16)
    name = "model.layers.0.self_attn.k_proj.weight"
    whole = base.get(name)
    for r0, r1 in [(0, 1), (3, 9), (0, whole.shape[0]), (5, 5)]:
        assert base.get_rows(name, r0, r1).tobytes() == whole[r0:r1].tobytes()
    with pytest.raises(ConvertError, match="k_proj"):
        base.get_rows(name, 3, whole.shape[0] + 1)


def test_chunk_errors_name_the_tensor_and_leave_nothing(base_bf16, tmp_path):
    base = open_checkpoint(base_bf16)
    name = "model.layers.0.mlp.up_proj.weight"
    a = base.get(name).astype(np.float32)
    short = ChunkedTensor(a.shape, a.dtype, iter([a[:10]]))
    with pytest.raises(ConvertError, match=rf"{name}.*10 of the tensor's {a.shape[0]} rows"):
        export_hf({name: short}, tmp_path / "out", base=base)
    bad = a.copy()
    bad[50, 3] = np.inf
    with pytest.raises(ConvertError, match=rf"{name}.*non-finite"):
        export_hf({name: chunks_of(bad, 16)}, tmp_path / "out", base=base)
    wrong = ChunkedTensor((a.shape[0], 3), a.dtype, iter([a[:, :3]]))
    with pytest.raises(ConvertError, match=rf"{name}.*shape"):
        export_hf({name: wrong}, tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_writer_holds_one_chunk_not_the_tensor(tmp_path):
    rows, cols, step = 4096, 2048, 64  # a 32 MiB float32 tensor in 512 KiB chunks

    def gen():
        for r0 in range(0, rows, step):
            yield np.arange(r0 * cols, (r0 + step) * cols, dtype=np.float32).reshape(step, cols)

    tracemalloc.start()
    w = StreamingSafetensorsWriter(tmp_path / "big.safetensors")
    w.add("big", ChunkedTensor((rows, cols), np.float32, gen()))
    w.close()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 << 20, peak  # a few chunks, never the 32 MiB tensor
    with safe_open(str(tmp_path / "big.safetensors"), framework="numpy") as f:
        got = f.get_tensor("big")
    np.testing.assert_array_equal(got.reshape(-1), np.arange(rows * cols, dtype=np.float32))


def test_rows_of_and_single_use():
    a = np.arange(30, dtype=np.float32).reshape(10, 3)
    t = rows_of(lambda r0, r1: a[r0:r1], a.shape, a.dtype, 4)
    assert [c.shape[0] for c in t] == [4, 4, 2]
    with pytest.raises(ValueError, match="only once"):
        list(t)
