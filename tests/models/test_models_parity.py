"""Flax NNX models vs transformers' PyTorch models, and the HF <-> Flax name maps.

Reference: tiny random-init transformers models built from local configs (no
hub). Weights go through ``convert.namemaps`` into our models; logits, hidden
states and per-linear-layer inputs (via torch forward pre-hooks) must agree in
float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from convert.namemaps import get_name_map, load_hf_state_dict_into_model, model_to_hf_state_dict  # noqa: E402
from sgtv_jax.models import (  # noqa: E402
    apply_block,
    build_abstract_model,
    build_model,
    forward_blockwise,
    get_block_state,
    get_model_class,
    set_block_state,
    split_block,
)

# fp32 end to end on CPU; differences come only from summation order.
TOL = 1e-4

B, S = 3, 12


def _common(**kw):
    # Larger init than HF's 0.02 so activations and logits are O(1) and the
    # comparison is meaningful rather than trivially small.
    kw.setdefault("initializer_range", 0.2)
    return kw


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **_common(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
        )
    ),
    "llama_tied": lambda: transformers.LlamaConfig(
        **_common(
            vocab_size=101,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    ),
    "llama3_rope": lambda: transformers.LlamaConfig(
        **_common(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    ),
    "llama_biases_linear_rope": lambda: transformers.LlamaConfig(
        **_common(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        )
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **_common(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    ),
    "mistral": lambda: transformers.MistralConfig(
        **_common(
            vocab_size=101,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=5,
        )
    ),
    "gpt2": lambda: transformers.GPT2Config(
        **_common(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    ),
    "gpt2_untied": lambda: transformers.GPT2Config(
        **_common(
            vocab_size=101,
            n_positions=32,
            n_embd=48,
            n_layer=2,
            n_head=4,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
    "bert": lambda: transformers.BertConfig(
        **_common(
            vocab_size=101,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=32,
            type_vocab_size=2,
        )
    ),
}

_TORCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}

_CACHE: dict[str, tuple] = {}


@nnx.jit
def _forward(model, ids, mask=None, positions=None):
    """Whole-model forward under one jit (eager op-by-op dispatch is slow on 2 shared cores)."""
    if positions is None:
        return model(ids, mask)
    return model(ids, mask, positions=positions)


def _reference(key: str):
    """(hf_config, torch model, numpy state dict, our loaded model), built once per key."""
    if key not in _CACHE:
        cfg = CONFIGS[key]()
        cfg._attn_implementation = "eager"  # plain softmax attention as the reference
        torch.manual_seed(0)
        tm = getattr(transformers, _TORCH_CLASSES[cfg.model_type])(cfg).eval()
        with torch.no_grad():  # non-trivial norm weights/biases (HF inits them to 1/0)
            for p in tm.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
        model = load_hf_state_dict_into_model(build_abstract_model(cfg), sd)
        _CACHE[key] = (cfg, tm, sd, model)
    return _CACHE[key]


def _inputs(vocab: int):
    rs = np.random.RandomState(1)
    ids = rs.randint(0, vocab, size=(B, S)).astype(np.int64)
    mask = np.ones((B, S), np.int64)
    mask[1, S - 4 :] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


def _defined(cfg, mask: np.ndarray) -> np.ndarray:
    """Positions whose outputs are defined: all for BERT (padded queries still see real keys);
    for decoders only real tokens (a left-padded query sees no real key at all)."""
    return np.ones_like(mask, bool) if cfg.model_type == "bert" else mask.astype(bool)


def _torch_out(cfg, tm, ids, mask):
    with torch.no_grad():
        out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state if cfg.model_type == "bert" else out.logits).numpy()


@pytest.mark.parametrize("key", list(CONFIGS))
def test_forward_parity_with_padding(key):
    cfg, tm, _, model = _reference(key)
    ids, mask = _inputs(cfg.vocab_size)
    ref = _torch_out(cfg, tm, ids, mask)
    ours = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    valid = _defined(cfg, mask)
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small
    diff = np.abs(ours - ref)[valid].max()
    assert diff <= TOL, f"{key}: max |diff| {diff}"
    if cfg.model_type == "bert":
        with torch.no_grad():
            pooled = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output.numpy()
        assert np.abs(np.asarray(model.pool(jnp.asarray(ours))) - pooled)[valid[:, 0]].max() <= TOL


def test_unpadded_forward_parity_llama():
    """No mask at all (attention_mask=None) equals HF without a mask."""
    cfg, tm, _, model = _reference("llama")
    ids, _ = _inputs(cfg.vocab_size)
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(_forward(model, jnp.asarray(ids))) - ref).max() <= TOL


def _hook_inputs(tm, prefix: str, names) -> tuple[dict[str, np.ndarray], list]:
    """Inputs of the named torch submodules, recorded by forward pre-hooks."""
    got, handles = {}, []
    for n in names:
        mod = tm.get_submodule(prefix + n)
        handles.append(
            mod.register_forward_pre_hook(lambda m, args, n=n: got.__setitem__(n, args[0].detach().numpy().copy()))
        )
    return got, handles


@pytest.mark.parametrize("key", ["llama", "qwen2", "gpt2", "bert"])
def test_blockwise_with_captures_matches_full_and_torch_hooks(key):
    cfg, tm, _, model = _reference(key)
    ids, mask = _inputs(cfg.vocab_size)
    valid = _defined(cfg, mask)
    full = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))

    nblocks = len(model.blocks)
    hooked = []
    for i in range(nblocks):
        got, handles = _hook_inputs(tm, model.hf_block_prefix(i), model.linear_names)
        hooked.append((got, handles))
    _torch_out(cfg, tm, ids, mask)
    for _, handles in hooked:
        for h in handles:
            h.remove()

    x = model.embed(jnp.asarray(ids))
    kw = model.block_kwargs(jnp.asarray(mask), S)
    before = apply_block._cache_size()
    for i in range(nblocks):
        graphdef, state = split_block(model, i)
        x, caps = apply_block(graphdef, state, x, capture=True, **kw)
        assert set(caps) == set(model.linear_names)
        ref_caps = hooked[i][0]
        for n in model.linear_names:
            c = np.asarray(caps[n])
            assert c.shape == ref_caps[n].shape, n
            d = np.abs(c - ref_caps[n])[valid].max()
            assert d <= TOL, f"{key} block {i} {n}: {d}"
    # All blocks of a model share one compiled program (capture=True).
    assert apply_block._cache_size() - before == 1
    out = np.asarray(model.head(x))
    assert np.abs(out - full)[valid].max() <= 1e-5
    fb = np.asarray(forward_blockwise(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(fb - full)[valid].max() <= 1e-5


def test_block_call_without_capture_equals_capture():
    cfg, tm, _, model = _reference("llama")
    ids, mask = _inputs(cfg.vocab_size)
    x = model.embed(jnp.asarray(ids))
    kw = model.block_kwargs(jnp.asarray(mask), S)
    y1 = model.blocks[0](x, **kw)
    y2, caps = model.blocks[0](x, capture=True, **kw)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    assert caps["self_attn.q_proj"].shape == (B, S, cfg.hidden_size)
    assert caps["mlp.down_proj"].shape == (B, S, cfg.intermediate_size)


def test_get_set_block_state():
    cfg, _, sd, _ = _reference("llama")
    model = load_hf_state_dict_into_model(build_abstract_model(cfg), sd)
    s1 = get_block_state(model, 1)
    set_block_state(model, 0, s1)
    hf = model_to_hf_state_dict(model)
    for k in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        np.testing.assert_array_equal(hf["model.layers.0." + k], sd["model.layers.1." + k])


@pytest.mark.parametrize("key", list(CONFIGS))
def test_round_trip_byte_identical(key):
    cfg, _, sd, model = _reference(key)
    nm = get_name_map(cfg.model_type)
    out = model_to_hf_state_dict(model)
    expected = nm.expected_hf_tensors(cfg)
    assert set(out) == set(expected)
    for name, arr in out.items():
        assert arr.dtype == sd[name].dtype and arr.shape == sd[name].shape == expected[name]
        assert arr.tobytes() == np.ascontiguousarray(sd[name]).tobytes(), name
    # Everything else in the torch state dict is a known non-parameter.
    for name in set(sd) - set(out):
        assert nm.is_ignored(name, cfg), name


def test_round_trip_bf16_per_tensor_and_whole_model():
    cfg, _, sd, _ = _reference("qwen2")
    nm = get_name_map("qwen2")
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    for name, arr in bf.items():
        path, flax_arr = nm.hf_to_flax(name, arr, cfg)
        assert flax_arr.dtype == ml_dtypes.bfloat16
        name2, back = nm.flax_to_hf(path, flax_arr, cfg)
        assert name2 == name and back.dtype == arr.dtype and back.tobytes() == arr.tobytes()
    model = load_hf_state_dict_into_model(build_abstract_model(cfg), bf)  # f32 params
    out = model_to_hf_state_dict(model, dtype=ml_dtypes.bfloat16)
    for name, arr in out.items():
        assert arr.dtype == ml_dtypes.bfloat16 and arr.tobytes() == bf[name].tobytes(), name


def test_qwen2_has_qkv_biases_and_linear_transposes():
    cfg, _, sd, model = _reference("qwen2")
    exp = get_name_map("qwen2").expected_hf_tensors(cfg)
    assert exp["model.layers.0.self_attn.q_proj.bias"] == (64,)
    assert exp["model.layers.0.self_attn.k_proj.bias"] == (32,)
    assert "model.layers.0.self_attn.o_proj.bias" not in exp
    k = np.asarray(model.blocks[0].self_attn.k_proj.kernel[...])
    np.testing.assert_array_equal(k, sd["model.layers.0.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(
        np.asarray(model.blocks[0].self_attn.k_proj.bias[...]), sd["model.layers.0.self_attn.k_proj.bias"]
    )


def test_gpt2_conv1d_not_transposed_and_c_attn_fused():
    cfg, _, sd, model = _reference("gpt2")
    w = sd["transformer.h.0.attn.c_attn.weight"]
    assert w.shape == (48, 144)
    np.testing.assert_array_equal(np.asarray(model.blocks[0].attn.c_attn.kernel[...]), w)


@pytest.mark.parametrize("tied_key,untied_key", [("llama_tied", "llama"), ("gpt2", "gpt2_untied")])
def test_tied_vs_untied_head(tied_key, untied_key):
    cfg_t, tm_t, sd_t, model_t = _reference(tied_key)
    cfg_u, _, sd_u, model_u = _reference(untied_key)
    nm = get_name_map(cfg_t.model_type)
    assert model_t.lm_head is None and model_u.lm_head is not None
    assert "lm_head.weight" not in nm.expected_hf_tensors(cfg_t)
    assert "lm_head.weight" in nm.expected_hf_tensors(cfg_u)
    assert "lm_head.weight" not in model_to_hf_state_dict(model_t)
    # A tied checkpoint loads without lm_head.weight; an untied one needs it.
    no_head = {k: v for k, v in sd_t.items() if k != "lm_head.weight"}
    load_hf_state_dict_into_model(build_abstract_model(cfg_t), no_head)
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_hf_state_dict_into_model(
            build_abstract_model(cfg_u), {k: v for k, v in sd_u.items() if k != "lm_head.weight"}
        )
    # The untied model really uses its own head: logits are x @ lm_head, not x @ embedding.T.
    ids, mask = _inputs(cfg_u.vocab_size)
    x = model_u.embed(jnp.asarray(ids))
    for blk in model_u.blocks:
        x = blk(x, **model_u.block_kwargs(jnp.asarray(mask), S))
    logits = np.asarray(model_u.head(x))
    emb = sd_u["model.embed_tokens.weight" if cfg_u.model_type == "llama" else "transformer.wte.weight"]
    normed = np.asarray((model_u.norm if cfg_u.model_type == "llama" else model_u.ln_f)(x))
    np.testing.assert_allclose(logits, normed @ sd_u["lm_head.weight"].T, atol=1e-5)
    assert np.abs(logits - normed @ emb.T).max() > 1e-2


def test_shape_mismatch_names_tensor_and_shapes():
    cfg, _, sd, _ = _reference("llama")
    bad = dict(sd)
    name = "model.layers.1.self_attn.k_proj.weight"
    bad[name] = np.zeros((31, 64), np.float32)  # config expects (32, 64)
    with pytest.raises(ValueError) as ei:
        load_hf_state_dict_into_model(build_abstract_model(cfg), bad)
    msg = str(ei.value)
    assert name in msg and "(31, 64)" in msg and "(32, 64)" in msg
    with pytest.raises(ValueError, match="k_proj"):
        get_name_map("llama").check_hf_tensor(name, (31, 64), cfg)
    with pytest.raises(ValueError, match="model.norm.weight"):
        get_name_map("llama").hf_to_flax("model.norm.weight", np.zeros((63,), np.float32), cfg)


def test_unknown_tensor_name_is_an_error():
    cfg, _, sd, _ = _reference("bert")
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.rotary"):
        load_hf_state_dict_into_model(
            build_abstract_model(cfg), {**sd, "encoder.layer.0.attention.self.rotary.weight": np.zeros(3)}
        )


def test_unknown_architecture_lists_supported():
    t5 = transformers.T5Config(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    for fn in (lambda: get_name_map("t5"), lambda: get_model_class("t5"), lambda: build_model(t5, nnx.Rngs(0))):
        with pytest.raises(ValueError) as ei:
            fn()
        msg = str(ei.value)
        assert "t5" in msg
        for arch in ("llama", "mistral", "qwen2", "gpt2", "bert"):
            assert arch in msg


def test_smollm2_135m_shapes_without_weights():
    """SmolLM2-135M geometry: tied, 9 heads / 3 KV heads, head_dim 64, 30 layers."""
    hf = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        max_position_embeddings=8192,
    )
    model = build_abstract_model(hf)
    exp = get_name_map("llama").expected_hf_tensors(hf)
    assert len(exp) == 1 + 30 * 9 + 1 and "lm_head.weight" not in exp
    assert exp["model.layers.29.self_attn.k_proj.weight"] == (192, 576)
    assert exp["model.layers.0.self_attn.q_proj.weight"] == (576, 576)
    assert model.blocks[29].mlp.down_proj.kernel.get_value().shape == (1536, 576)
    out = nnx.eval_shape(lambda m: m(jnp.zeros((2, 64), jnp.int32), jnp.ones((2, 64), jnp.int32)), model)
    assert out.shape == (2, 64, 49152) and out.dtype == jnp.float32


def test_explicit_positions_for_left_padding_match_hf_position_ids():
    """Left padding with positions = cumsum(mask) - 1, as HF generate does."""
    cfg, tm, _, model = _reference("llama3_rope")
    ids, mask = _inputs(cfg.vocab_size)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        ref = tm(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
        ).logits.numpy()
    ours = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= TOL


@pytest.mark.parametrize("key", ["llama", "qwen2", "gpt2", "bert"])
def test_block_prefix_and_linear_names_match_hf_tensors(key):
    cfg, _, _, model = _reference(key)
    exp = get_name_map(cfg.model_type).expected_hf_tensors(cfg)
    for i in range(len(model.blocks)):
        for n in model.linear_names:
            assert model.hf_block_prefix(i) + n + ".weight" in exp


def test_alternative_hf_spellings_load():
    """GPT2Model names (no ``transformer.``) and BertForMaskedLM names (``bert.``, ``cls.*``)."""
    cfg, _, sd, ref = _reference("gpt2")
    bare = {k[len("transformer.") :] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    m = load_hf_state_dict_into_model(build_abstract_model(cfg), bare)
    assert (
        model_to_hf_state_dict(m)["transformer.h.1.mlp.c_fc.weight"].tobytes()
        == sd["transformer.h.1.mlp.c_fc.weight"].tobytes()
    )
    cfg, _, sd, _ = _reference("bert")
    mlm = {"bert." + k: v for k, v in sd.items()}
    mlm["cls.predictions.bias"] = np.zeros(cfg.vocab_size, np.float32)
    m = load_hf_state_dict_into_model(build_abstract_model(cfg), mlm)
    np.testing.assert_array_equal(
        model_to_hf_state_dict(m)["encoder.layer.0.output.dense.weight"], sd["encoder.layer.0.output.dense.weight"]
    )


def test_registry_builds_random_models():
    for key, cls_name in [
        ("mistral", "LlamaForCausalLM"),
        ("qwen2", "LlamaForCausalLM"),
        ("gpt2", "GPT2LMHeadModel"),
        ("bert", "BertModel"),
    ]:
        assert get_model_class(CONFIGS[key]().model_type).__name__ == cls_name
    # One random init end to end (eager init compiles per shape, so only one: runtime budget).
    cfg = CONFIGS["mistral"]()
    model = build_model(cfg, nnx.Rngs(0))
    assert isinstance(model, get_model_class("mistral"))
    out = nnx.jit(lambda m, i: m(i))(model, jnp.zeros((1, 4), jnp.int32))
    assert out.shape == (1, 4, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.std(model.blocks[0].self_attn.q_proj.kernel[...])) > 0


@pytest.mark.parametrize("key", ["llama", "llama3_rope", "llama_biases_linear_rope", "qwen2", "mistral"])
def test_rope_inverse_frequencies_match_transformers(key):
    cfg, tm, _, model = _reference(key)
    ref = tm.model.rotary_emb.inv_freq.numpy()
    ours = np.asarray(model.config.rope_inv_freq, np.float32)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    assert model.config.rope_attention_scaling == float(tm.model.rotary_emb.attention_scaling)
