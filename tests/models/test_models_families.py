"""The newer decoder families (qwen3, phi3, gemma2, gemma3_text, mixtral, qwen2_moe, qwen3_moe) vs transformers.

Reference: tiny random transformers models (eager attention, float32) saved
with ``save_pretrained``, so the tensor names under test are the ones real
checkpoints carry (v5 fuses MoE experts in memory but saves them per expert).
Checks per family: logits over a padded batch, greedy decoding, block-by-block
forward with captures vs torch forward pre-hooks, HF -> Flax -> HF bytes,
``sgtv convert`` to Orbax and back.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert import export_flax_model, load_flax_model, restore_orbax  # noqa: E402
from convert.architectures import get_architecture  # noqa: E402
from convert.cli import main as convert_main  # noqa: E402
from convert.namemaps import get_name_map  # noqa: E402
from sgtv_jax.models import apply_block, forward_blockwise, split_block  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

TOL = 1e-4  # float32 end to end; differences come only from summation order
B, S = 3, 12
NEW_TOKENS = 8


def _common(**kw):
    # Larger init than HF's 0.02 so logits are O(1) and the comparison means something.
    base = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    return base


CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(**_common(head_dim=24, tie_word_embeddings=False)),
    "qwen3_tied": lambda: transformers.Qwen3Config(**_common(head_dim=16, tie_word_embeddings=True)),
    # LongRoPE with original_max 8 < S: the forward uses the long factors, decoding switches at 9 tokens.
    "phi3": lambda: transformers.Phi3Config(
        **_common(
            sliding_window=7,
            max_position_embeddings=64,
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
    # Alternating sliding (window 5 < S) / full layers, both soft-caps, query_pre_attn_scalar != head_dim.
    "gemma2": lambda: transformers.Gemma2Config(
        **_common(
            hidden_size=48,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        )
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **_common(
            hidden_size=48,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
            final_logit_softcapping=None,
            tie_word_embeddings=False,
        )
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **_common(num_local_experts=4, num_experts_per_tok=2, sliding_window=6)
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
        **_common(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=24)
    ),
}
MOE_KEYS = ("mixtral", "qwen2_moe", "qwen3_moe")

# Families whose state_dict in memory differs from what save_pretrained writes are read from disk.
_CACHE: dict[str, tuple] = {}


def _read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _raw(directory: Path) -> dict[str, tuple[str, tuple, bytes]]:
    return {k: (str(a.dtype), a.shape, a.tobytes()) for k, a in _read_safetensors(directory).items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def _reference(key: str, workdir: Path):
    """(hf_config, torch model, saved HF directory, our model loaded from it), built once per key."""
    if key not in _CACHE:
        cfg = CONFIGS[key]()
        cfg._attn_implementation = "eager"  # plain softmax attention as the reference
        torch.manual_seed(0)
        tm = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # non-trivial norm weights (HF inits them to 1 or 0)
            for _, p in tm.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        d = workdir / key
        tm.save_pretrained(d, max_shard_size="200KB")
        model, _ = load_flax_model(d)
        _CACHE[key] = (cfg, tm, d, model)
    return _CACHE[key]


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def _inputs(vocab: int):
    rs = np.random.RandomState(1)
    ids = rs.randint(3, vocab, size=(B, S)).astype(np.int64)
    mask = np.ones((B, S), np.int64)
    mask[1, S - 4 :] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


def _torch_logits(tm, ids, mask):
    with torch.no_grad():
        return tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


KEYS = list(CONFIGS)


@pytest.mark.parametrize("key", KEYS)
def test_forward_parity_with_padding(key, workdir):
    cfg, tm, _, model = _reference(key, workdir)
    ids, mask = _inputs(cfg.vocab_size)
    ref = _torch_logits(tm, ids, mask)
    ours = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    valid = mask.astype(bool)  # a left-padded query sees no real key: its output is undefined
    assert np.abs(ref).max() > 1.0
    diff = float(np.abs(ours - ref)[valid].max())
    print(f"\n{key}: max |logit diff| {diff:.3g} (max |logit| {np.abs(ref).max():.3g})")
    assert diff <= TOL, f"{key}: max |diff| {diff}"


@pytest.mark.parametrize("key", KEYS)
def test_greedy_decoding_identical(key, workdir):
    """Our model, re-run over a right-padded buffer (one compiled shape), picks HF generate's tokens."""
    cfg, tm, _, model = _reference(key, workdir)
    prompt = np.random.RandomState(2).randint(3, cfg.vocab_size, size=(1, 5)).astype(np.int64)
    with torch.no_grad():
        ref = tm.generate(
            torch.tensor(prompt),
            attention_mask=torch.ones_like(torch.tensor(prompt)),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=cfg.pad_token_id,
        ).numpy()[0, prompt.shape[1] :]
    n = prompt.shape[1]
    buf = np.zeros((1, n + NEW_TOKENS), np.int64)
    buf[0, :n] = prompt[0]
    mask = np.zeros_like(buf)
    mask[0, :n] = 1
    # LongRoPE picks its factors from the sequence length, so a padded buffer would change the
    # frequencies: run those models on the exact prefix (one compilation per length).
    exact = getattr(model.config, "rope_long", None) is not None
    for t in range(NEW_TOKENS):
        end = n + t if exact else buf.shape[1]
        logits = np.asarray(_forward(model, jnp.asarray(buf[:, :end]), jnp.asarray(mask[:, :end])))
        buf[0, n + t] = int(np.argmax(logits[0, n + t - 1]))
        mask[0, n + t] = 1
    np.testing.assert_array_equal(buf[0, n:], ref)


def _hook_inputs(tm, names_by_module: dict[str, str]):
    """Inputs of torch submodules (module path -> capture key), recorded by forward pre-hooks."""
    got, handles = {}, []
    for path, key in names_by_module.items():
        mod = tm.get_submodule(path)
        handles.append(
            mod.register_forward_pre_hook(
                lambda m, args, key=key: got.__setitem__(key, args[0].detach().numpy().copy())
            )
        )
    return got, handles


def _torch_capture_modules(tm, model, i: int) -> dict[str, str]:
    """torch module path -> our capture key, for block ``i``'s linear layers that are torch modules.

    (MoE experts are one fused module in memory; ``test_moe_captures_...`` covers them.)
    """
    prefix = model.hf_block_prefix(i)
    out = {}
    for n in model.linear_names:
        try:
            tm.get_submodule(prefix + n)
        except AttributeError:
            continue
        out[prefix + n] = n
    return out


@pytest.mark.parametrize("key", KEYS)
def test_blockwise_captures_match_full_forward_and_torch_hooks(key, workdir):
    cfg, tm, _, model = _reference(key, workdir)
    ids, mask = _inputs(cfg.vocab_size)
    valid = mask.astype(bool)
    full = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    hooked = [_hook_inputs(tm, _torch_capture_modules(tm, model, i)) for i in range(len(model.blocks))]
    _torch_logits(tm, ids, mask)
    for _, handles in hooked:
        for h in handles:
            h.remove()

    x = model.embed(jnp.asarray(ids))
    kw = model.block_kwargs(jnp.asarray(mask), S)
    for i in range(len(model.blocks)):
        graphdef, state = split_block(model, i)
        x, caps = apply_block(graphdef, state, x, capture=True, **kw)
        ref_caps = hooked[i][0]
        assert len(ref_caps) >= 4 and set(ref_caps) <= set(caps), (set(ref_caps), set(caps))
        for n, ref in ref_caps.items():
            c = np.asarray(caps[n]).reshape(ref.shape)
            v = valid.reshape(-1) if ref.ndim == 2 else valid
            d = np.abs(c - ref)[v].max()
            assert d <= TOL, f"{key} block {i} {n}: {d}"
    out = np.asarray(model.head(x))
    assert np.abs(out - full)[valid].max() <= 1e-5
    fb = np.asarray(forward_blockwise(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(fb - full)[valid].max() <= 1e-5


@pytest.mark.parametrize("key", KEYS)
def test_hf_flax_hf_byte_identical(key, workdir, tmp_path):
    cfg, _, d, model = _reference(key, workdir)
    out = export_flax_model(model, tmp_path / "out", base=d, dtype="fp32", max_shard_size="200KB")
    src, dst = _raw(d), _raw(out)
    nm = get_name_map(cfg.model_type)
    assert set(dst) == set(nm.expected_hf_tensors(cfg))
    assert dst == {k: v for k, v in src.items() if not nm.is_ignored(k, cfg)}
    assert all(nm.is_ignored(k, cfg) for k in set(src) - set(dst))


@pytest.mark.parametrize("key", KEYS)
def test_convert_cli_orbax_round_trip_exact(key, workdir, tmp_path):
    """``sgtv convert --format orbax`` then restore and write HF again: same bytes, same logits."""
    cfg, _, d, model = _reference(key, workdir)
    assert convert_main(["convert", str(d), str(tmp_path / "ck"), "--format", "orbax", "-q"]) == 0
    restored, hf_cfg = restore_orbax(tmp_path / "ck")
    assert hf_cfg["model_type"] == cfg.model_type
    a = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(restored, nnx.Param))}
    b = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    out = export_flax_model(restored, tmp_path / "hf", base=d, dtype="fp32")
    nm = get_name_map(cfg.model_type)
    assert _raw(out) == {k: v for k, v in _raw(d).items() if not nm.is_ignored(k, cfg)}
    # The CLI's Orbax -> HF direction: the same bytes, and transformers loads it.
    assert convert_main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf3"), "-q"]) == 0
    assert _raw(tmp_path / "hf3") == _raw(out)
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf3"))
    # And the CLI's HF -> HF path (safetensors re-sharded, bytes kept).
    assert convert_main(["convert", str(d), str(tmp_path / "hf2"), "-q", "--max-shard-size", "100KB"]) == 0
    assert _raw(tmp_path / "hf2") == _raw(d)


@pytest.mark.parametrize("key", KEYS)
def test_registry_row_and_linear_names(key, workdir):
    cfg, _, _, model = _reference(key, workdir)
    row = get_architecture(cfg.model_type)
    assert isinstance(model, row.model_class) and hasattr(transformers, row.hf_class)
    assert type(transformers.AutoModelForCausalLM.from_config(cfg)).__name__ == row.hf_class
    exp = get_name_map(cfg.model_type).expected_hf_tensors(cfg)
    for i in range(len(model.blocks)):
        for n in model.linear_names:
            assert model.hf_block_prefix(i) + n + ".weight" in exp, n


def test_qwen3_qk_norm_is_per_head_and_phi3_is_fused(workdir):
    cfg, _, d, model = _reference("qwen3", workdir)
    exp = get_name_map("qwen3").expected_hf_tensors(cfg)
    assert exp["model.layers.0.self_attn.q_norm.weight"] == (24,)
    assert "model.layers.0.self_attn.q_proj.bias" not in exp  # qwen3: no q/k/v bias, unlike qwen2
    cfg, _, _, model = _reference("phi3", workdir)
    exp = get_name_map("phi3").expected_hf_tensors(cfg)
    assert exp["model.layers.1.self_attn.qkv_proj.weight"] == ((4 + 2 * 2) * 16, 64)
    assert exp["model.layers.1.mlp.gate_up_proj.weight"] == (2 * 96, 64)
    assert model.linear_names == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


# --------------------------------------------------------------------------- RoPE scalings

_ROPES = {
    "yarn": (
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
        128,
        1.0,
    ),
    "yarn_mscale": (
        {
            "rope_type": "yarn",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "mscale": 0.7,
            "mscale_all_dim": 1.0,
            "beta_fast": 16,
            "beta_slow": 2,
            "original_max_position_embeddings": 64,
        },
        512,
        1.0,
    ),
    "yarn_partial_untruncated": (
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 2.0,
            "truncate": False,
            "original_max_position_embeddings": 32,
        },
        64,
        0.5,
    ),
    "longrope": (
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.2, 1.5, 2.0, 2.2, 3.0, 3.5, 4.0],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 9.0, 10.0, 12.0, 16.0],
            "original_max_position_embeddings": 16,
        },
        128,
        1.0,
    ),
    "linear_partial": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}, 64, 0.75),
}


@pytest.mark.parametrize("name", list(_ROPES))
def test_rope_scalings_match_transformers_init_functions(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sgtv_jax.models.common import rope_inv_freq, rope_long_inv_freq

    params, max_pos, prf = _ROPES[name]
    params = dict(params, partial_rotary_factor=prf)
    hf = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16 if prf == 1.0 else 32,
        max_position_embeddings=max_pos,
        rope_parameters=dict(params),
    )
    head_dim = hf.head_dim
    inv, scaling = rope_inv_freq(head_dim, hf.rope_parameters, max_pos)
    ref, ref_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, None)
    np.testing.assert_allclose(np.asarray(inv, np.float32), ref.numpy(), rtol=1e-6, atol=0)
    assert len(inv) == int(head_dim * prf) // 2
    assert scaling == pytest.approx(float(ref_scaling), rel=1e-7)
    if params["rope_type"] != "yarn":
        assert scaling == 1.0 or name == "longrope"
    long = rope_long_inv_freq(head_dim, hf.rope_parameters, max_pos)
    if name == "longrope":
        ref_long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=params["original_max_position_embeddings"] + 1)
        np.testing.assert_allclose(np.asarray(long[0], np.float32), ref_long.numpy(), rtol=1e-6, atol=0)
        assert long[1] == params["original_max_position_embeddings"]
        assert scaling > 1.0  # sqrt(1 + ln(factor) / ln(original)) with factor = 128 / 16
    else:
        assert long is None


def test_yarn_rope_model_logits_match_transformers(workdir):
    """A whole model with YaRN (attention factor != 1)."""
    cfg = transformers.LlamaConfig(
        **_common(
            head_dim=16,
            max_position_embeddings=32,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        )
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    tm = transformers.LlamaForCausalLM(cfg).eval()
    tm.save_pretrained(workdir / "yarn")
    model, _ = load_flax_model(workdir / "yarn")
    assert model.config.rope_attention_scaling > 1.0 and len(model.config.rope_inv_freq) == 8
    ids, mask = _inputs(cfg.vocab_size)
    diff = np.abs(np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask))) - _torch_logits(tm, ids, mask))
    assert diff[mask.astype(bool)].max() <= TOL


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "proportional", "rope_theta": 10000.0},
    ],
)
def test_unsupported_rope_type_is_named(rope):
    from sgtv_jax.models.common import rope_inv_freq

    with pytest.raises(ValueError, match=f"unsupported rope_type '{rope['rope_type']}'.*yarn, longrope"):
        rope_inv_freq(16, rope, 128)


# --------------------------------------------------------------------------- Gemma specifics


def test_gemma_embedding_scale_rounds_in_bf16_like_hf(workdir):
    """sqrt(48) is multiplied in the parameter dtype: bf16(6.928...) = 6.9375, as HF's scaled embedding."""
    cfg, tm, d, _ = _reference("gemma2", workdir)
    model_bf16, _ = load_flax_model(d, param_dtype=jnp.bfloat16)
    ids = np.arange(3, 40).reshape(1, -1)
    ours = np.asarray(model_bf16.embed(jnp.asarray(ids)).astype(jnp.float32))
    emb = transformers.Gemma2ForCausalLM(cfg).to(torch.bfloat16).model.embed_tokens
    with torch.no_grad():
        emb.weight.copy_(tm.model.embed_tokens.weight.to(torch.bfloat16))
        ref = emb(torch.tensor(ids)).float().numpy()
    np.testing.assert_array_equal(ours, ref)
    exact = tm.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()[ids] * 48**0.5
    assert np.abs(ours - exact).max() > 0  # the rounding of the scale is visible


def test_gemma_sliding_and_full_blocks_compile_once_each(workdir):
    """Layer type is static: blocks 0 and 2 (sliding) share a graphdef, block 1 (full) has its own."""
    cfg, _, _, model = _reference("gemma3", workdir)
    g = [split_block(model, i)[0] for i in range(3)]
    assert g[0] == g[2] and g[0] != g[1]
    ids, mask = _inputs(cfg.vocab_size)
    kw = model.block_kwargs(jnp.asarray(mask), S)
    x = model.embed(jnp.asarray(ids))
    # The window matters: the sliding mask drops keys the full mask keeps.
    assert bool(jnp.any(kw["masks"]["full_attention"] & ~kw["masks"]["sliding_attention"]))
    y_as_sliding = apply_block(g[0], split_block(model, 1)[1], x, **kw)
    y_as_full = apply_block(g[1], split_block(model, 1)[1], x, **kw)
    assert float(jnp.abs(y_as_sliding - y_as_full).max()) > 1e-3


# --------------------------------------------------------------------------- MoE specifics


@pytest.mark.parametrize("key", MOE_KEYS)
def test_moe_captures_match_torch_experts_and_router(key, workdir):
    """Expert inputs, routing weights and per-expert down-projection inputs vs transformers' fused experts."""
    from sgtv_jax.models.moe import EXPERT_NAMES, MOE_PREFIX, linear_input

    cfg, tm, _, model = _reference(key, workdir)
    ids, mask = _inputs(cfg.vocab_size)
    valid = mask.reshape(-1).astype(bool)
    kind = model.config.moe
    p, (g_name, _, d_name) = MOE_PREFIX[kind], EXPERT_NAMES[kind]
    n_exp = model.config.num_experts
    got, handles = {}, []
    for i in range(len(model.blocks)):
        mod = tm.get_submodule(f"model.layers.{i}.mlp.experts")  # in memory the MoE block is always `mlp`
        handles.append(
            mod.register_forward_pre_hook(lambda m, args, i=i: got.__setitem__(i, [a.detach().clone() for a in args]))
        )
        mod = tm.get_submodule(f"model.layers.{i}.mlp.gate")
        handles.append(
            mod.register_forward_pre_hook(
                lambda m, args, i=i: got.__setitem__(("gate", i), args[0].detach().numpy().copy())
            )
        )
    _torch_logits(tm, ids, mask)
    for h in handles:
        h.remove()

    x = model.embed(jnp.asarray(ids))
    kw = model.block_kwargs(jnp.asarray(mask), S)
    for i in range(len(model.blocks)):
        graphdef, state = split_block(model, i)
        x, caps = apply_block(graphdef, state, x, capture=True, **kw)
        hidden, top_idx, top_w = got[i]
        xs = np.asarray(caps[f"{p}.experts"]).reshape(-1, cfg.hidden_size)
        assert np.abs(xs - hidden.numpy())[valid].max() <= TOL
        gate_in = np.asarray(caps[f"{p}.gate"]).reshape(-1, cfg.hidden_size)
        assert np.abs(gate_in - got[("gate", i)])[valid].max() <= TOL
        dense = np.zeros((xs.shape[0], n_exp), np.float32)
        np.put_along_axis(dense, top_idx.numpy(), top_w.float().numpy(), axis=1)
        w = np.asarray(caps[f"{p}.routing_weights"]).reshape(-1, n_exp)
        assert np.abs(w - dense)[valid].max() <= 1e-5
        assert ((w > 0).sum(-1) == model.config.num_experts_per_tok).all()
        if model.config.norm_topk_prob:
            np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
        experts = tm.get_submodule(f"model.layers.{i}.mlp.experts")
        for e in range(n_exp):
            gate, up = torch.nn.functional.linear(hidden, experts.gate_up_proj[e]).chunk(2, dim=-1)
            h_ref = (experts.act_fn(gate) * up).detach().numpy()
            h = np.asarray(caps[f"{p}.experts.{e}.{d_name}"]).reshape(h_ref.shape)
            assert np.abs(h - h_ref)[valid].max() <= TOL, (i, e)
            xin, tw = linear_input(caps, f"{p}.experts.{e}.{g_name}")
            assert xin is caps[f"{p}.experts"] and np.array_equal(
                np.asarray(tw), np.asarray(caps[f"{p}.routing_weights"])[..., e]
            )
            xin, tw = linear_input(caps, f"{p}.experts.{e}.{d_name}")
            assert xin is caps[f"{p}.experts.{e}.{d_name}"] and tw.shape == (B, S)
        assert linear_input(caps, "self_attn.q_proj")[1] is None


def test_moe_name_maps_use_saved_per_expert_names(workdir):
    cfg, _, d, model = _reference("mixtral", workdir)
    exp = get_name_map("mixtral").expected_hf_tensors(cfg)
    assert exp["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == (64, 96)
    assert exp["model.layers.1.block_sparse_moe.gate.weight"] == (4, 64)
    assert not any(".mlp." in k for k in exp)
    assert "block_sparse_moe.gate" not in model.linear_names  # the router is merged data-free
    cfg, _, _, model = _reference("qwen2_moe", workdir)
    exp = get_name_map("qwen2_moe").expected_hf_tensors(cfg)
    assert exp["model.layers.0.mlp.shared_expert_gate.weight"] == (1, 64)
    assert exp["model.layers.0.mlp.shared_expert.down_proj.weight"] == (64, 48)
    assert exp["model.layers.0.mlp.experts.2.up_proj.weight"] == (32, 64)
    assert exp["model.layers.0.self_attn.q_proj.bias"] == (64,)
    # A fused in-memory name (what state_dict() gives in v5) is not a checkpoint tensor.
    with pytest.raises(ValueError, match="experts.gate_up_proj"):
        get_name_map("qwen2_moe").check_hf_tensor("model.layers.0.mlp.experts.gate_up_proj", (4, 64, 64), cfg)


def test_qwen_moe_with_dense_layers_is_refused():
    cfg = transformers.Qwen3MoeConfig(
        **_common(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1])
    )
    with pytest.raises(ValueError, match=r"qwen3_moe: only configs where every layer is sparse.*mlp_only_layers=\[1\]"):
        get_name_map("qwen3_moe").expected_hf_tensors(cfg)


# --------------------------------------------------------------------------- GGUF

_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in fixed:
        return fixed[name]
    _, _, i, *rest = name.split(".")
    return f"blk.{i}.{_GGUF_BLOCK['.'.join(rest[:-1])]}.{rest[-1]}"


def test_qwen3_gguf_matches_transformers_loader_and_our_model(workdir, tmp_path):
    """A qwen3 GGUF as llama.cpp writes it (NEOX RoPE: q/k unpermuted, q/k norms as attn_{q,k}_norm)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from convert import GGUFCheckpoint, open_checkpoint, validate_checkpoint

    cfg, tm, d, model = _reference("qwen3", workdir)
    sd = _read_safetensors(d)
    path = tmp_path / "qwen3.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    quantized = "model.layers.1.mlp.up_proj.weight"
    for name, arr in sd.items():
        if name == quantized:  # Q8_0 needs rows of 32: (96, 64) fits
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(_gguf_name(name), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(_gguf_name(name), np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    g = open_checkpoint(path)
    assert isinstance(g, GGUFCheckpoint) and validate_checkpoint(g) == "qwen3"
    assert g.config["head_dim"] == 24 and g.config["num_attention_heads"] == 4
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=tm)["tensors"]
    assert set(g.names()) == set(theirs) == set(sd)
    for name, arr in g:
        np.testing.assert_array_equal(arr, theirs[name].float().numpy(), err_msg=name)
        if name != quantized:
            np.testing.assert_array_equal(arr, sd[name], err_msg=name)
    # Loaded into our model, the GGUF gives the same logits as the checkpoint it came from (up to Q8_0).
    ours, _ = load_flax_model(path)
    ids, mask = _inputs(cfg.vocab_size)
    a = np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    b = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert 0 < np.abs(a - b)[mask.astype(bool)].max() < 0.1
