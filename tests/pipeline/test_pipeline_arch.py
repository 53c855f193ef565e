"""The pipeline's architecture plumbing: declared input groups and the tensor layout of a block model.

A family declares which linear layers of a block read the same input
(`input_groups(config)`: one Hessian per group). The independent expectation is the
block itself: run it once with `capture=True` and group the linear layers
whose captured inputs are the same array object. A routed expert's groups
carry its routing weights; their expectation is `moe.linear_input`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from convert.architectures import ARCHITECTURES
from sgtv_jax.models import build_model, split_block
from sgtv_jax.models.moe import linear_input
from sgtv_jax.pipeline.arch import declared_input_groups

TINY = {
    "llama": transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    ),
    "gpt2": transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=4, n_positions=32),
    "bert": transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=32,
    ),
}


def _groups_by_identity(hf_config) -> list[tuple[str, ...]]:
    """Linear layers of block 0 whose captured inputs are one array, in capture order."""
    model = build_model(hf_config)
    ids = jnp.zeros((2, 5), jnp.int32)
    mask = jnp.ones((2, 5), jnp.int32)
    x = model.embed(ids)
    kw = model.block_kwargs(mask, 5, batch=2)
    graphdef, state = split_block(model, 0)
    out: dict[str, list[tuple[str, ...]]] = {}

    def f(state, x):
        _, caps = nnx.merge(graphdef, state)(x, capture=True, **kw)
        by_id: dict[int, list[str]] = {}
        for n, v in caps.items():
            by_id.setdefault(id(v), []).append(n)
        out["groups"] = [tuple(g) for g in by_id.values()]
        return 0

    jax.eval_shape(f, state, x)
    return out["groups"]


def _declared(hf_config):
    model = build_model(hf_config)
    fam = ARCHITECTURES[hf_config.model_type].family
    return declared_input_groups(fam, model.config, tuple(model.linear_names))


@pytest.mark.parametrize("family", sorted(TINY))
def test_declared_input_groups_equal_the_blocks_shared_inputs(family):
    assert [g.names for g in _declared(TINY[family])] == _groups_by_identity(TINY[family])


def test_fused_phi3_groups_equal_the_blocks_shared_inputs():
    cfg = transformers.Phi3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    assert [g.names for g in _declared(cfg)] == _groups_by_identity(cfg)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_groups_read_each_experts_routed_input(kind):
    """Each declared group's (input, token weights) is what `moe.linear_input` gives each of its layers."""
    small = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        num_experts_per_tok=2,
    )
    cfg = (
        transformers.MixtralConfig(**small, intermediate_size=8, num_local_experts=3)
        if kind == "mixtral"
        else transformers.Qwen2MoeConfig(
            **small, moe_intermediate_size=8, shared_expert_intermediate_size=12, num_experts=3
        )
    )
    groups = _declared(cfg)
    model = build_model(cfg)
    ids = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    x = model.embed(ids)
    _, caps = model.blocks[0](x, capture=True, **model.block_kwargs(jnp.ones((2, 5), jnp.int32), 5, batch=2))
    weighted = 0
    for g in groups:
        xin, w = g.inputs(caps)
        for n in g.names:
            ref_x, ref_w = linear_input(caps, n)
            assert xin is ref_x, n
            assert (w is None) == (ref_w is None), n
            if w is not None:
                weighted += 1
                assert np.array_equal(np.asarray(w), np.asarray(ref_w)), n
    assert weighted == 3 * 3  # gate, up, down of each routed expert; the shared expert is unweighted
    routers = {"block_sparse_moe.gate", "mlp.gate", "mlp.shared_expert_gate"}  # merged data-free
    assert routers.isdisjoint(n for g in groups for n in g.names)


def test_a_wrong_declaration_is_refused():
    class Fam:
        __name__ = "fake"

        @staticmethod
        def input_groups(config):
            return (("a", "b"), ("b",))

    with pytest.raises(ValueError, match="exactly once"):
        declared_input_groups(Fam, None, ("a", "b", "c"))


def test_bad_input_group_declarations_are_refused():
    from sgtv_jax.models.groups import InputGroup, as_input_group

    with pytest.raises(ValueError, match="weights_key and column go together"):
        InputGroup(("mlp.experts.0.w2",), weights_key="block_sparse_moe.routing_weights")
    with pytest.raises(ValueError, match="at least one linear layer"):
        InputGroup(())
    with pytest.raises(TypeError, match="tuple of linear layer names"):
        as_input_group("self_attn.q_proj")
    assert as_input_group(("a", "b")).input_key == "a"
