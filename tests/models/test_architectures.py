"""The architecture registry agrees with what each family and name map declares."""

import pytest
import transformers

from convert.architectures import ARCHITECTURES, GGUF_ARCHITECTURES, GGUF_MOE_VARIANTS, get_architecture
from convert.errors import ConvertError
from convert.namemaps import get_name_map
from convert.readers import supported_architectures
from sgtv_jax.models import SUPPORTED_MODEL_TYPES, get_family, get_model_class


def test_every_flax_family_is_registered_and_nothing_else():
    assert set(ARCHITECTURES) == set(SUPPORTED_MODEL_TYPES) == set(supported_architectures())


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_row_matches_family_and_name_map(model_type):
    row = get_architecture(model_type)
    assert row.family is get_family(model_type)
    assert model_type in row.family.MODEL_TYPES
    assert row.model_class is get_model_class(model_type)
    assert row.name_map is get_name_map(model_type)
    # hf_class must be a real transformers class name for this model_type.
    assert hasattr(transformers, row.hf_class)


def test_gguf_rows():
    assert {a: r.model_type for a, r in GGUF_ARCHITECTURES.items()} == {
        "llama": "llama",
        "mistral": "mistral",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "phi3": "phi3",
        "qwen2moe": "qwen2_moe",
        "qwen3moe": "qwen3_moe",
        "gemma2": "gemma2",
        "gemma3": "gemma3_text",
    }
    # llama.cpp writes Mixtral as "llama" with expert tensors.
    assert {a: r.model_type for a, r in GGUF_MOE_VARIANTS.items()} == {"llama": "mixtral"}
    # qwen2 GGUFs use NEOX RoPE: q/k stored unpermuted.
    assert not GGUF_ARCHITECTURES["qwen2"].gguf_permuted_qk
    assert GGUF_ARCHITECTURES["llama"].gguf_permuted_qk


def test_unknown_architecture_names_supported():
    with pytest.raises(ConvertError, match="unsupported architecture 't5'.*llama"):
        get_architecture("t5")
