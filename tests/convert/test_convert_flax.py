"""convert: HF -> Flax NNX -> HF byte-identical round trips, and Orbax save/restore bit-exact."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
namemaps = pytest.importorskip("convert.namemaps")

from convert import (  # noqa: E402
    ConvertError,
    convert_to_orbax,
    export_flax_model,
    export_hf,
    hf_config_object,
    load_flax_model,
    open_checkpoint,
    read_orbax_metadata,
    restore_orbax,
    save_orbax,
)
from convert.cli import main as convert_main  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

TINY = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "bert": lambda: transformers.BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    ),
}


def save_tiny(kind: str, path: Path, dtype=torch.float32) -> Path:
    torch.manual_seed(0)
    cfg = TINY[kind]()
    if kind == "bert":
        model = transformers.BertModel(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="30KB")
    return path


def raw(directory: Path) -> dict[str, tuple[str, tuple, bytes]]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                a = h.get_tensor(k)
                out[k] = (str(a.dtype), a.shape, a.tobytes())
    return out


def params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("llama", torch.float32),
        ("qwen2", torch.float32),
        ("gpt2", torch.float32),
        ("bert", torch.float32),
        ("llama", torch.bfloat16),
    ],
)
def test_hf_flax_hf_byte_identical(tmp_path, kind, dtype):
    base_dir = save_tiny(kind, tmp_path / "base", dtype)
    base = open_checkpoint(base_dir)
    import jax.numpy as jnp

    pd = jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32
    model, cfg = load_flax_model(base, param_dtype=pd)
    hf = namemaps.model_to_hf_state_dict(model)
    out = export_hf(
        hf,
        tmp_path / "out",
        base=base,
        dtype="bf16" if dtype == torch.bfloat16 else "fp32",
        fill_from_base=False,
        max_shard_size="30KB",
    )
    src, dst = raw(base_dir), raw(out)
    # Buffers that are not model parameters (e.g. BERT position_ids) are not round-tripped.
    nm, hf_cfg = namemaps.get_name_map(kind), hf_config_object(base.config)
    params_only = {k: v for k, v in src.items() if not nm.is_ignored(k, hf_cfg)}
    assert dst.keys() == params_only.keys()
    for k in dst:
        assert dst[k] == params_only[k], k


def test_export_flax_model_streams_byte_identical(tmp_path):
    base_dir = save_tiny("llama", tmp_path / "base", torch.bfloat16)
    import jax.numpy as jnp

    model, _ = load_flax_model(base_dir, param_dtype=jnp.bfloat16)
    out = export_flax_model(
        model, tmp_path / "out", base=base_dir, dtype="bf16", max_shard_size="30KB", model_card={"method": "identity"}
    )
    assert raw(out) == raw(base_dir)
    # Edited parameters are what gets written; the tied head stays tied.
    model.blocks[0].mlp.up_proj.kernel[...] = model.blocks[0].mlp.up_proj.kernel[...] * 2
    out2 = export_flax_model(model, tmp_path / "out2", base=base_dir, dtype="fp32")
    got = open_checkpoint(out2).get("model.layers.0.mlp.up_proj.weight")
    want = open_checkpoint(base_dir).get("model.layers.0.mlp.up_proj.weight").astype(np.float32) * 2
    np.testing.assert_array_equal(got, want)
    assert "lm_head.weight" not in open_checkpoint(out2)


def test_orbax_round_trip_bit_exact(tmp_path):
    base_dir = save_tiny("qwen2", tmp_path / "base")
    out = convert_to_orbax(base_dir, tmp_path / "ck")
    meta = read_orbax_metadata(out)
    assert meta["model_type"] == "qwen2" and meta["hf_config"]["hidden_size"] == 32
    restored, cfg = restore_orbax(out)
    direct, _ = load_flax_model(base_dir)
    a, b = params(restored), params(direct)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    ids = np.arange(1, 13, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(direct(ids)))
    with pytest.raises(ConvertError, match="already exists"):
        save_orbax(restored, out, hf_config=cfg)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck.")]


def test_orbax_custom_module_bf16(tmp_path):
    class Toy(nnx.Module):
        def __init__(self, cfg, rngs):
            self.lin = nnx.Linear(cfg["d"], 5, rngs=rngs)
            self.scale = nnx.Param(jax.random.normal(rngs.params(), (7,)).astype(ml_dtypes.bfloat16))

    m = Toy({"d": 3}, nnx.Rngs(42))
    save_orbax(m, tmp_path / "toy", hf_config={"model_type": "toy", "d": 3})
    r, cfg = restore_orbax(tmp_path / "toy", build=lambda c: Toy(c, nnx.Rngs(0)))
    assert cfg == {"model_type": "toy", "d": 3}
    a, b = params(r), params(m)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()


def test_orbax_bf16_model_restores_as_bf16(tmp_path):
    base_dir = save_tiny("llama", tmp_path / "base", torch.bfloat16)
    out = convert_to_orbax(base_dir, tmp_path / "ck")  # auto: the source's bf16
    assert read_orbax_metadata(out)["param_dtype"] == "bfloat16"
    restored, _ = restore_orbax(out)
    import jax.numpy as jnp

    direct, _ = load_flax_model(base_dir, param_dtype=jnp.bfloat16)
    a, b = params(restored), params(direct)
    for k in a:
        assert a[k].dtype == b[k].dtype == jnp.bfloat16 and a[k].tobytes() == b[k].tobytes(), k


def test_cli_orbax(tmp_path):
    base_dir = save_tiny("gpt2", tmp_path / "base")
    assert convert_main(["convert", str(base_dir), str(tmp_path / "ck"), "--format", "orbax", "-q"]) == 0
    restored, _ = restore_orbax(tmp_path / "ck")
    direct, _ = load_flax_model(base_dir)
    a, b = params(restored), params(direct)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
