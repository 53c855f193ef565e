"""convert: GGUF files of phi3, gemma2, gemma3, qwen2moe, qwen3moe and mixtral, as llama.cpp writes them.

Each tiny random Hugging Face model is saved, then written to GGUF by llama.cpp's
converter rules: tensor names from the ``gguf`` package's own table (llama.cpp's),
experts stacked as ``[E, out, in]``, gemma RMSNorm weights stored as ``1 + w``,
llama/mixtral q/k rows permuted, phi3's LongRoPE factors as tensors and the
metadata keys its converter writes. Our reader must give back the saved tensors
exactly, agree with transformers' ``load_gguf_checkpoint`` tensor by tensor
(where transformers reads that GGUF architecture: not mixtral, which llama.cpp
writes as ``llama``), and ``sgtv convert`` of the file must load in
transformers with the original model's logits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from convert import GGUFCheckpoint, open_checkpoint, validate_checkpoint
from sgtv_jax.cli import main

os.environ["HF_HUB_OFFLINE"] = "1"

VOCAB, HIDDEN, FF, HEADS, KV, HEAD_DIM = 64, 64, 96, 4, 2, 16
GEMMA_HEAD_DIM = 32  # != hidden / heads, so the query scale rule below is exercised
PAD, BOS, EOS = 0, VOCAB - 2, VOCAB - 1


def _common(**kw) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        max_position_embeddings=64,
        initializer_range=0.2,  # logits O(1): the comparison means something
        rms_norm_eps=1e-5,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return base | kw


# Tiny configs llama.cpp can represent (e.g. gemma's query_pre_attn_scalar is the head dim below 27B).
CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    # LongRoPE with partial rotary (12 of 16 dims) and a sliding window.
    "phi3": lambda: transformers.Phi3Config(
        **_common(
            sliding_window=7,
            original_max_position_embeddings=8,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.0, 2.0, 3.0, 4.0, 6.0, 8.0],
                "original_max_position_embeddings": 8,
            },
        )
    ),
    # Sliding (window 5) on even layers, global on odd; both soft-caps.
    "gemma2": lambda: transformers.Gemma2Config(
        **_common(
            num_hidden_layers=3,
            head_dim=GEMMA_HEAD_DIM,
            query_pre_attn_scalar=GEMMA_HEAD_DIM,
            sliding_window=5,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        )
    ),
    # Six layers: llama.cpp's gemma3 makes every sixth one global; linear RoPE scaling on global layers only.
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **_common(
            num_hidden_layers=6,
            head_dim=GEMMA_HEAD_DIM,
            query_pre_attn_scalar=GEMMA_HEAD_DIM,
            sliding_window=4,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
            tie_word_embeddings=False,
        )
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_common(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
        )
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_common(
            num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=HEAD_DIM
        )
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **_common(
            num_local_experts=4, num_experts_per_tok=2, rope_parameters={"rope_theta": 1e6, "rope_type": "default"}
        )
    ),
}
GGUF_ARCH = {
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "mixtral": "llama",
}
# One tensor per family stored as Q8_0 (rows of 64): an expert stack where there is one.
QUANTIZED = {
    "phi3": "model.layers.1.self_attn.qkv_proj.weight",
    "gemma2": "model.layers.0.mlp.up_proj.weight",
    "gemma3_text": "model.layers.5.self_attn.q_proj.weight",
    "qwen2_moe": "model.layers.1.mlp.experts.{e}.up_proj.weight",
    "qwen3_moe": "model.layers.0.mlp.experts.{e}.gate_proj.weight",
    "mixtral": "model.layers.1.block_sparse_moe.experts.{e}.w3.weight",
}
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (HF split-half RoPE rows -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(key: str, cfg, sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under llama.cpp's names and layouts."""
    arch = GGUF_ARCH[key]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, arr in sd.items():
        if m := _EXPERT.match(name):
            stacks.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = arr
            continue
        stem, suffix = name.rsplit(".", 1)
        gname = names.get_name(stem)
        assert gname is not None, name
        if key.startswith("gemma") and name.endswith("norm.weight"):
            arr = arr + np.float32(1.0)  # llama.cpp's Gemma converters: ggml's RMSNorm multiplies by w
        if key == "mixtral" and ".q_proj." in name:
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        if key == "mixtral" and ".k_proj." in name:
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if name.endswith("shared_expert_gate.weight"):
            arr = arr.reshape(-1)  # llama.cpp's qwen2moe declares it [n_embd]
        out[f"{gname}.{suffix}"] = arr
    for stem, experts in stacks.items():
        gname = names.get_name(stem)
        assert gname is not None, stem
        out[f"{gname}.weight"] = np.stack([experts[e] for e in range(len(experts))])
    return out


def write_llama_cpp_gguf(path: Path, key: str, cfg, sd: dict[str, np.ndarray], *, quantize: str | None) -> Path:
    """Write ``sd`` (HF names) as llama.cpp's convert_hf_to_gguf.py would for this family."""
    arch = GGUF_ARCH[key]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {key}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if getattr(cfg, "head_dim", None) is not None and key != "phi3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    rope = cfg.rope_parameters
    if key == "phi3":
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * cfg.hidden_size) // cfg.num_attention_heads)
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_sliding_window(cfg.sliding_window or 0)
        scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(
            float(np.sqrt(1 + np.log(scale) / np.log(cfg.original_max_position_embeddings)))
        )
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    elif key == "gemma2":  # llama.cpp writes no RoPE base for gemma2 (10000)
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    elif key == "gemma3_text":
        full = rope["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    else:
        w.add_rope_freq_base(rope["rope_theta"])
    if key in ("qwen2_moe", "qwen3_moe"):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if key == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    elif key == "mixtral":
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["t", "1", "t1"] + [f"x{i}" for i in range(VOCAB - 6)] + ["<unk>", "<s>", "</s>"])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(["t 1"])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(PAD)
    qname = _gguf_tensors(key, cfg, {quantize.format(e=0): sd[quantize.format(e=0)]}) if quantize else {}
    for gname, arr in _gguf_tensors(key, cfg, sd).items():
        if gname in qname:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class Family:
    """One family's tiny model: its config, PyTorch model, saved tensors and two GGUF files (F32, one Q8_0)."""

    def __init__(self, key: str, root: Path) -> None:
        torch.manual_seed(0)
        self.key, self.cfg = key, CONFIGS[key]()
        model = transformers.AutoModelForCausalLM.from_config(self.cfg, attn_implementation="eager").eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    # Norms (init 0 or 1) and biases made random; multiples of 1/64 in [-1, 1]
                    # stay exact through llama.cpp's gemma "1 + w", so the round trip is exact.
                    p.copy_(torch.randint(-64, 65, p.shape, generator=gen).float() / 64)
        self.model = model
        self.hf_dir = root / "hf"
        model.save_pretrained(self.hf_dir)
        self.sd = dict(open_checkpoint(self.hf_dir))
        self.f32 = write_llama_cpp_gguf(root / "f32.gguf", key, self.cfg, self.sd, quantize=None)
        self.q8 = write_llama_cpp_gguf(root / "q8.gguf", key, self.cfg, self.sd, quantize=QUANTIZED[key])


_FAMILIES: dict[str, Family] = {}


@pytest.fixture(params=sorted(CONFIGS))
def fam(request, tmp_path_factory) -> Family:
    if request.param not in _FAMILIES:
        _FAMILIES[request.param] = Family(request.param, tmp_path_factory.mktemp(request.param))
    return _FAMILIES[request.param]


def _unfuse(theirs: dict[str, torch.Tensor], cfg) -> dict[str, np.ndarray]:
    """transformers v5 holds experts fused in memory ([E, 2I, D] gate_up, [E, D, I] down): per-expert names."""
    out = {}
    for name, t in theirs.items():
        a = t.float().numpy()
        if name.endswith("mlp.experts.gate_up_proj"):
            half = a.shape[1] // 2
            for e in range(a.shape[0]):
                out[f"{name[: -len('gate_up_proj')]}{e}.gate_proj.weight"] = a[e, :half]
                out[f"{name[: -len('gate_up_proj')]}{e}.up_proj.weight"] = a[e, half:]
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(a.shape[0]):
                out[f"{name[: -len('down_proj')]}{e}.down_proj.weight"] = a[e]
        else:
            out[name] = a
    return out


def test_reader_recovers_the_checkpoint_exactly(fam):
    g = open_checkpoint(fam.f32)
    assert isinstance(g, GGUFCheckpoint) and g.arch.model_type == fam.key
    assert validate_checkpoint(g) == fam.key
    assert set(g.names()) == set(fam.sd)
    for name, arr in g:
        assert arr.dtype == np.float32 and g.shape(name) == fam.sd[name].shape, name
        np.testing.assert_array_equal(arr, fam.sd[name], err_msg=name)


def test_config_from_metadata_equals_the_original(fam):
    ours = GGUFCheckpoint(fam.f32).hf_config().to_dict()
    want = fam.cfg.to_dict()
    if "head_dim" in want and want["head_dim"] is None:  # mixtral: None means hidden / heads
        want["head_dim"] = want["hidden_size"] // want["num_attention_heads"]
    skip = {"architectures", "dtype", "transformers_version", "_name_or_path", "initializer_range", "name_or_path"}
    diff = {k: (ours.get(k), v) for k, v in want.items() if k not in skip and ours.get(k) != v}
    assert not diff


def test_reader_matches_transformers_gguf_loader(fam):
    if fam.key == "mixtral":
        pytest.skip("transformers reads llama.cpp's Mixtral (arch 'llama') as a dense llama: no expert tensors")
    g = GGUFCheckpoint(fam.q8)
    # transformers maps names through the model it is given; its GGUF config drops e.g. expert sizes.
    theirs = _unfuse(
        load_gguf_checkpoint(str(fam.q8), return_tensors=True, model_to_load=fam.model)["tensors"], fam.cfg
    )
    assert set(theirs) == set(g.names())
    quantized = {n for n in g.names() if g.tensor_type(n) == "Q8_0"}
    assert quantized == {QUANTIZED[fam.key].format(e=e) for e in range(getattr(fam.cfg, "num_experts", 1))}
    for name, arr in g:
        np.testing.assert_array_equal(arr, theirs[name], err_msg=name)
        if name in quantized:  # lossy, but close to what was written
            assert 0 < np.abs(arr - fam.sd[name]).max() < 0.05, name


def test_sgtv_convert_loads_in_transformers_with_the_original_logits(fam, tmp_path):
    out = tmp_path / "hf"
    assert main(["convert", str(fam.f32), str(out)]) == 0
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([[5, 9, 3, 11, 20, 7, 7, 30, 2, 14, 41, 8], [PAD, PAD, 6, 1, 12, 19, 4, 22, 33, 3, 10, 9]])
    mask = (torch.arange(12) >= torch.tensor([[0], [2]])).long()
    with torch.no_grad():
        a = ours.eval()(input_ids=ids, attention_mask=mask).logits.numpy()
        b = fam.model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("arch", "blocks"), [("gemma2", 46), ("gemma3", 62), ("gemma2", 42), ("gemma3", 48)])
def test_gemma_query_scale_follows_llama_cpp_model_size_rule(tmp_path, arch, blocks):
    """llama.cpp stores no query_pre_attn_scalar: 1/sqrt(hidden/heads) for the 27B models, else 1/sqrt(head_dim)."""
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), arch)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(blocks)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_key_length(GEMMA_HEAD_DIM)
    w.add_sliding_window(8)
    w.add_tensor("token_embd.weight", np.zeros((VOCAB, HIDDEN), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = GGUFCheckpoint(tmp_path / "g.gguf").config
    want = HIDDEN // HEADS if blocks in (46, 62) else GEMMA_HEAD_DIM
    assert (cfg["head_dim"], cfg["query_pre_attn_scalar"]) == (GEMMA_HEAD_DIM, want)
