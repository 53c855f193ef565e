"""convert: GGUF reading on tiny llama files written with gguf.GGUFWriter."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from convert import ConvertError, GGUFCheckpoint, convert_to_hf, open_checkpoint, validate_checkpoint

os.environ["HF_HUB_OFFLINE"] = "1"

VOCAB, HIDDEN, FF, LAYERS, HEADS, KV = 64, 32, 48, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim logic of llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def hf_tensors(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*s):
        return rng.standard_normal(s).astype(np.float32)

    t = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": r(HIDDEN)}
    if not tied:
        t["lm_head.weight"] = r(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": r(HIDDEN),
            p + "post_attention_layernorm.weight": r(HIDDEN),
            p + "self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": r(KV * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": r(KV * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": r(FF, HIDDEN),
            p + "mlp.up_proj.weight": r(FF, HIDDEN),
            p + "mlp.down_proj.weight": r(HIDDEN, FF),
        }
    return t


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def to_gguf_name(name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in fixed:
        return fixed[name]
    _, _, i, *rest = name.split(".")
    return f"blk.{i}.{GGUF_NAMES['.'.join(rest[:-1])]}.{rest[-1]}"


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    quantize: set[str] = frozenset(),
    permute: bool = True,
) -> Path:
    """Write a llama GGUF as llama.cpp's converter would (q/k permuted), with tokenizer metadata."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    # A valid little BPE vocabulary: the merge "t 1" needs "t", "1" and "t1".
    tokens = ["t", "1", "t1"] + [f"x{i}" for i in range(VOCAB - 6)] + ["<unk>", "<s>", "</s>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(["t 1"])
    w.add_bos_token_id(VOCAB - 2)
    w.add_eos_token_id(VOCAB - 1)
    for name, arr in tensors.items():
        if not permute:
            pass  # Qwen2 uses NEOX (split-half) RoPE: llama.cpp stores q/k as HF does
        elif ".q_proj." in name:
            arr = llama_cpp_permute(arr, HEADS, HEADS)
        elif ".k_proj." in name:
            arr = llama_cpp_permute(arr, HEADS, KV)
        gname = to_gguf_name(name)
        if name in quantize:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf_model(path: Path):
    """transformers' own GGUF loading: its config, then its tensors into its model.

    ``from_pretrained(dir, gguf_file=...)`` insists on accelerate (not a dependency
    here), so call the loader it uses, ``load_gguf_checkpoint``, directly.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model, {k: v.detach().float().numpy() for k, v in tensors.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_recovers_hf_tensors(tmp_path, tied):
    ref = hf_tensors(tied)
    path = write_gguf(tmp_path / "tiny.gguf", ref)
    g = open_checkpoint(path)
    assert isinstance(g, GGUFCheckpoint)
    assert set(g.names()) == set(ref)
    for name, arr in g:
        assert arr.dtype == np.float32 and g.shape(name) == ref[name].shape
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)
    c = g.config
    assert c["tie_word_embeddings"] is tied
    assert (c["model_type"], c["vocab_size"], c["hidden_size"], c["intermediate_size"]) == ("llama", VOCAB, HIDDEN, FF)
    assert (c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (LAYERS, HEADS, KV)
    assert c["rms_norm_eps"] == 1e-5 and c["rope_parameters"]["rope_theta"] == 50000.0
    assert (c["bos_token_id"], c["eos_token_id"]) == (VOCAB - 2, VOCAB - 1)


def test_gguf_matches_transformers_loader(tmp_path):
    """transformers' own GGUF loader (independent permutation inverse) agrees tensor by tensor."""
    pytest.importorskip("torch")
    ref = hf_tensors(tied=False, seed=1)
    path = write_gguf(
        tmp_path / "tiny.gguf",
        ref,
        quantize={"model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"},
    )
    _, theirs = transformers_gguf_model(path)
    g = GGUFCheckpoint(path)
    assert set(theirs) == set(g.names())
    for name, arr in g:
        np.testing.assert_array_equal(arr, theirs[name], err_msg=name)
    # Q8_0 is lossy: the dequantised tensor is close to, not equal to, the original.
    q = g.get("model.layers.0.self_attn.q_proj.weight")
    assert g.tensor_type("model.layers.0.self_attn.q_proj.weight") == "Q8_0"
    assert 0 < np.abs(q - ref["model.layers.0.self_attn.q_proj.weight"]).max() < 0.05


def test_qwen2_gguf_with_biases_matches_transformers(tmp_path):
    pytest.importorskip("torch")
    ref = hf_tensors(tied=False, seed=4)
    rng = np.random.default_rng(5)
    for i in range(LAYERS):
        for proj, rows in (("q_proj", HEADS * HEAD_DIM), ("k_proj", KV * HEAD_DIM), ("v_proj", KV * HEAD_DIM)):
            ref[f"model.layers.{i}.self_attn.{proj}.bias"] = rng.standard_normal(rows).astype(np.float32)
    path = write_gguf(tmp_path / "qwen.gguf", ref, arch="qwen2", permute=False)
    g = open_checkpoint(path)
    assert g.config["model_type"] == "qwen2" and validate_checkpoint(g) == "qwen2"
    _, theirs = transformers_gguf_model(path)
    assert set(g.names()) == set(theirs) == set(ref)
    for name, arr in g:
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)
        np.testing.assert_array_equal(arr, theirs[name], err_msg=name)


def test_gguf_to_hf_directory(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    ref = hf_tensors(tied=True, seed=2)
    path = write_gguf(tmp_path / "tiny.gguf", ref)
    out = convert_to_hf(path, tmp_path / "hf", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer_config.json").is_file()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs, _ = transformers_gguf_model(path)
    ids = torch.arange(3, 19).reshape(1, 16)
    with torch.no_grad():
        np.testing.assert_array_equal(ours(ids).logits.numpy(), theirs(ids).logits.numpy())


def test_gguf_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", hf_tensors(tied=True), arch="falcon")
    with pytest.raises(
        ConvertError,
        match=r"odd\.gguf.*'falcon' is not supported; supported: gemma2, gemma3, llama, mistral, phi3, qwen2, qwen2moe, qwen3, qwen3moe",
    ):
        open_checkpoint(path)


def test_gguf_corrupt_file(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", hf_tensors(tied=True))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match=r"t\.gguf"):
        GGUFCheckpoint(path)
