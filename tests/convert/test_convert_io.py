"""convert: readers, export and bad input on tiny random models saved by transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import (  # noqa: E402
    UNCHANGED,
    ConvertError,
    SafetensorsCheckpoint,
    TorchBinCheckpoint,
    convert_to_hf,
    export_hf,
    open_checkpoint,
    validate_checkpoint,
)
from convert.cli import main as convert_main  # noqa: E402
from convert.model_card import read_front_matter  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"


def tiny_llama_config(**kw):
    args = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    args.update(kw)
    return transformers.LlamaConfig(**args)


def save_tiny(path: Path, *, dtype=torch.float32, shard="40KB", bin_format=False, **kw) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(**kw)).to(dtype).eval()
    if bin_format:
        # transformers 5 writes only safetensors; a .bin checkpoint is a torch.save'd state dict.
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
        torch.save(
            {
                k: v.contiguous()
                for k, v in model.state_dict().items()
                if k != "lm_head.weight" or not model.config.tie_word_embeddings
            },
            path / "pytorch_model.bin",
        )
    else:
        model.save_pretrained(path, max_shard_size=shard)
    (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')  # copied verbatim by export
    return path


def torch_state(path: Path) -> dict[str, np.ndarray]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    out = {}
    for k, v in model.state_dict().items():
        if v.dtype == torch.bfloat16:
            out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = v.numpy()
    return out


def read_raw(directory: Path) -> dict[str, tuple[str, bytes, tuple]]:
    """name -> (dtype, raw bytes, shape) straight from the safetensors files."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                a = h.get_tensor(k)
                out[k] = (str(a.dtype), a.tobytes(), a.shape)
    return out


def logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.numpy()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("base16") / "tiny", dtype=torch.bfloat16)


# -- readers ----------------------------------------------------------------------


def test_sharded_reader_matches_transformers(sharded):
    assert (sharded / "model.safetensors.index.json").is_file()
    ckpt = open_checkpoint(sharded)
    assert isinstance(ckpt, SafetensorsCheckpoint) and len(ckpt.shards) > 2
    ref = torch_state(sharded)
    got = dict(iter(ckpt))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == np.float32 and ckpt.shape(k) == ref[k].shape
        np.testing.assert_array_equal(got[k], ref[k])
    # Random access by name, any order.
    np.testing.assert_array_equal(ckpt.get("model.norm.weight"), ref["model.norm.weight"])
    np.testing.assert_array_equal(ckpt.get("model.embed_tokens.weight"), ref["model.embed_tokens.weight"])
    assert validate_checkpoint(ckpt) == "llama"
    assert ckpt.config["model_type"] == "llama"


def test_bf16_reader_gives_ml_dtypes(sharded_bf16):
    ckpt = open_checkpoint(sharded_bf16)
    ref = torch_state(sharded_bf16)
    for name, arr in ckpt:
        assert arr.dtype == np.dtype(ml_dtypes.bfloat16)
        assert arr.tobytes() == ref[name].tobytes()


def test_single_file_and_bin_readers(tmp_path):
    single = save_tiny(tmp_path / "single", shard="10GB")
    assert (single / "model.safetensors").is_file()
    binned = save_tiny(tmp_path / "bin", bin_format=True)
    a, b = open_checkpoint(single), open_checkpoint(binned)
    assert isinstance(b, TorchBinCheckpoint)
    assert set(a.names()) == set(b.names())
    for name in a.names():
        np.testing.assert_array_equal(a.get(name), b.get(name))
    # .bin -> safetensors conversion keeps every tensor's bytes.
    out = convert_to_hf(binned, tmp_path / "from_bin", max_shard_size="40KB")
    assert read_raw(out) == read_raw(single)


def test_sharded_bin_reader(tmp_path):
    """pytorch_model.bin.index.json with two pickle shards, loaded with weights_only."""
    single = save_tiny(tmp_path / "single", shard="10GB")
    ref = dict(iter(open_checkpoint(single)))
    d = tmp_path / "binsharded"
    d.mkdir()
    (d / "config.json").write_text((single / "config.json").read_text())
    names = sorted(ref)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, part in halves.items():
        torch.save({n: torch.from_numpy(ref[n].copy()) for n in part}, d / fname)
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}})
    )
    ckpt = open_checkpoint(d)
    assert isinstance(ckpt, TorchBinCheckpoint) and set(ckpt.names()) == set(ref)
    for name, arr in ckpt:
        np.testing.assert_array_equal(arr, ref[name])
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ConvertError, match="pytorch_model-00002-of-00002.bin.*missing"):
        open_checkpoint(d)


# -- export -----------------------------------------------------------------------


def test_round_trip_byte_identical_and_loadable(sharded, tmp_path):
    base = open_checkpoint(sharded)
    out = export_hf(
        iter(base), tmp_path / "out", config=base.config, dtype="fp32", max_shard_size="50KB", copy_files_from=sharded
    )
    src, dst = read_raw(sharded), read_raw(out)
    assert src.keys() == dst.keys()
    for k in src:
        assert dst[k] == src[k], k
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src)
    assert index["metadata"]["total_size"] == sum(len(v[1]) for v in src.values())
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as h:
            assert h.metadata() == {"format": "pt"}
        # max_shard_size holds unless a single tensor is bigger than it.
        assert f.stat().st_size < 50_000 + 33_000
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    ids = torch.arange(1, 17).reshape(1, 16) % 128
    np.testing.assert_array_equal(logits(out, ids), logits(sharded, ids))
    assert not list(tmp_path.glob(".out.*"))  # no temporary directories left


def test_unchanged_tensors_pass_through_bytes(sharded_bf16, tmp_path):
    base = open_checkpoint(sharded_bf16)
    name = "model.layers.0.mlp.up_proj.weight"
    merged = base.get(name).astype(np.float32) * 2.0
    out = export_hf(
        {name: merged, "model.norm.weight": UNCHANGED},
        tmp_path / "m",
        base=base,
        dtype="bf16",
        model_card={"method": "ties+obs", "base_model": "tiny", "models": ["a", "b"], "parameters": {"density": 0.2}},
    )
    src, dst = read_raw(sharded_bf16), read_raw(out)
    assert src.keys() == dst.keys()  # fill_from_base adds every untouched tensor
    for k in src:
        if k != name:
            assert dst[k] == src[k], k
    assert dst[name][0] == "bfloat16"
    np.testing.assert_array_equal(
        np.frombuffer(dst[name][1], ml_dtypes.bfloat16).reshape(merged.shape), merged.astype(ml_dtypes.bfloat16)
    )
    card = (out / "README.md").read_text()
    assert "ties+obs" in card and "density: 0.2" in card and "`a`" in card
    meta = read_front_matter(card)  # the Hub's keys, parsed back by a YAML parser
    assert meta["base_model"] == ["tiny", "a", "b"] and meta["base_model_relation"] == "merge", meta
    assert meta["library_name"] == "transformers" and meta["tags"][:2] == ["merge", "sgtv-jax"], meta
    ids = torch.arange(1, 9).reshape(1, 8)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize(
    "dtype,np_dtype,cfg_name", [("bf16", ml_dtypes.bfloat16, "bfloat16"), ("fp16", np.float16, "float16")]
)
def test_dtype_conversion(sharded, tmp_path, dtype, np_dtype, cfg_name):
    out = convert_to_hf(sharded, tmp_path / dtype, dtype=dtype, max_shard_size="30KB")
    ref = dict(iter(open_checkpoint(sharded)))
    got = open_checkpoint(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == cfg_name
    for name, arr in got:
        assert arr.dtype == np.dtype(np_dtype)
        # Same rounding as numpy/ml_dtypes' round-to-nearest-even cast.
        assert arr.tobytes() == ref[name].astype(np_dtype).tobytes()
    # transformers' own cast agrees (torch rounds to nearest even too).
    tmodel = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    w = tmodel.model.layers[1].self_attn.q_proj.weight.detach()
    tcast = w.to(torch.bfloat16 if dtype == "bf16" else torch.float16)
    ours = got.get("model.layers.1.self_attn.q_proj.weight")
    assert ours.view(np.int16).tobytes() == tcast.view(torch.int16).numpy().tobytes()


# -- bad input ----------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _no_partial(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_missing_shard(sharded, tmp_path):
    d = _copy(sharded, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConvertError, match=victim.name + ".*missing"):
        open_checkpoint(d)
    with pytest.raises(ConvertError, match=victim.name):
        convert_to_hf(d, tmp_path / "out")
    _no_partial(tmp_path, "out")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(sharded, tmp_path, damage):
    d = _copy(sharded, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\xff" * 64 + data[64:])
    with pytest.raises(ConvertError, match=f"{victim.name}.*(truncated or corrupt)"):
        convert_to_hf(d, tmp_path / "out")
    _no_partial(tmp_path, "out")


def test_unknown_architecture(sharded, tmp_path):
    d = _copy(sharded, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"unsupported architecture 'falcon'; supported: .*llama.*gpt2.*bert"):
        convert_to_hf(d, tmp_path / "out")
    _no_partial(tmp_path, "out")


def test_shape_disagrees_with_config(sharded, tmp_path):
    d = _copy(sharded, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 80  # the stored MLP weights are 96 wide
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        convert_to_hf(d, tmp_path / "out")
    _no_partial(tmp_path, "out")


def test_bin_without_torch(tmp_path):
    d = save_tiny(tmp_path / "bin", bin_format=True)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from convert import open_checkpoint, ConvertError\n"
        f"try:\n    open_checkpoint({str(d)!r})\n"
        "except ConvertError as e:\n    print('ERR', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "pytorch_model.bin" in res.stdout and "needs torch" in res.stdout


def test_nan_tensor_refused_without_partial_output(sharded, tmp_path):
    base = open_checkpoint(sharded)
    bad = base.get("model.layers.1.mlp.down_proj.weight").copy()
    bad[3, 5] = np.nan
    with pytest.raises(ConvertError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*non-finite"):
        export_hf({"model.layers.1.mlp.down_proj.weight": bad}, tmp_path / "out", base=base, max_shard_size="20KB")
    _no_partial(tmp_path, "out")
    # fp32 -> fp16 overflow to inf is refused as well.
    huge = base.get("model.norm.weight") * 1e6
    with pytest.raises(ConvertError, match=r"model\.norm\.weight.*non-finite"):
        export_hf({"model.norm.weight": huge}, tmp_path / "out", base=base, dtype="fp16")
    _no_partial(tmp_path, "out")


def test_interrupted_export_leaves_nothing(sharded, tmp_path):
    base = open_checkpoint(sharded)

    def stream():
        for i, item in enumerate(base):
            if i == 7:
                raise KeyboardInterrupt  # e.g. Ctrl-C after some shards were written
            yield item

    with pytest.raises(KeyboardInterrupt):
        export_hf(stream(), tmp_path / "out", config=base.config, max_shard_size="20KB")
    _no_partial(tmp_path, "out")


def test_existing_destination_refused_unless_overwrite(sharded, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(ConvertError, match="already exists"):
        convert_to_hf(sharded, dst)
    assert (dst / "keep").is_file()
    # --overwrite replaces only an empty directory or a previous output of this tool
    with pytest.raises(ConvertError, match=r"not an output of sgtv-jax.*\(keep\)"):
        convert_to_hf(sharded, dst, overwrite=True)
    assert (dst / "keep").read_text() == "x"
    (dst / "keep").unlink()
    convert_to_hf(sharded, dst, overwrite=True)
    (dst / "stale").write_text("y")
    convert_to_hf(sharded, dst, overwrite=True)
    assert not (dst / "stale").exists() and (dst / "config.json").is_file()


def test_shape_mismatch_against_base(sharded, tmp_path):
    base = open_checkpoint(sharded)
    with pytest.raises(ConvertError, match=r"model\.norm\.weight.*shape \(3,\)"):
        export_hf({"model.norm.weight": np.ones(3, np.float32)}, tmp_path / "out", base=base)
    _no_partial(tmp_path, "out")


# -- command line -------------------------------------------------------------------


def test_cli_convert_and_errors(sharded, tmp_path, capsys):
    rc = convert_main(
        ["convert", str(sharded), str(tmp_path / "o"), "--dtype", "bf16", "--max-shard-size", "30KB", "-q"]
    )
    assert rc == 0 and (tmp_path / "o" / "model.safetensors.index.json").is_file()
    rc = convert_main(["convert", str(sharded), str(tmp_path / "o"), "-q"])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_python_m_convert_and_sgtv_entry(sharded, tmp_path):
    root = Path(__file__).parents[2]
    res = subprocess.run(
        [sys.executable, "-m", "convert", "convert", str(sharded), str(tmp_path / "a"), "-q"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert res.returncode == 0, res.stderr
    from sgtv_jax.cli import main as sgtv_main

    assert sgtv_main(["convert", str(sharded), str(tmp_path / "b"), "-q"]) == 0
    assert read_raw(tmp_path / "a") == read_raw(tmp_path / "b") == read_raw(sharded)


def test_streaming_writer_matches_safetensors(tmp_path):
    """Our streaming writer produces files safetensors reads back bit for bit, all dtypes."""
    from safetensors.numpy import save_file

    from convert.safetensors_writer import StreamingSafetensorsWriter

    rng = np.random.default_rng(3)
    tensors = {
        "f32": rng.standard_normal((5, 7)).astype(np.float32),
        "bf16": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((9,)).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "b": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "noncontig": rng.standard_normal((4, 6)).astype(np.float32).T,
    }
    w = StreamingSafetensorsWriter(tmp_path / "ours.safetensors", metadata={"format": "pt"})
    for k, v in tensors.items():
        w.add(k, v)
    w.close()
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"))
    assert not list(tmp_path.glob("*.data"))
    with safe_open(str(tmp_path / "ours.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == np.ascontiguousarray(v).tobytes()
    from safetensors.torch import load_file

    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["i64"].tolist() == [[0, 1, 2], [3, 4, 5]]
