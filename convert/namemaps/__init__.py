"""Hugging Face tensor names <-> Flax NNX state paths, one map per architecture family.

Per-tensor interface (streams: one tensor in, one tensor out; ``config`` is a
transformers config or our frozen dataclass from ``sgtv_jax.models``)::

    nm = get_name_map(model_type)            # any model_type of convert.architectures
    nm.expected_hf_tensors(config) -> {hf_name: hf_shape}     # what a checkpoint must hold
    nm.check_hf_tensor(name, shape, config) -> Rule | None    # ValueError: names tensor + both shapes
    nm.is_ignored(name, config) -> bool                       # buffers, tied lm_head copies, ...
    nm.hf_to_flax(name, array, config) -> (flax_path, array) | None   # None = ignorable tensor
    nm.flax_to_hf(flax_path, array, config) -> (hf_name, array)
    nm.hf_name_to_flax_path(name, config) / nm.flax_path_to_hf_name(path, config)
    nm.rules(config) -> [Rule(hf_name, flax_path, transpose, hf_shape)]

``hf_to_flax`` raises ValueError for a name the architecture does not have.
Transposes (``nn.Linear`` ``[out, in]`` <-> kernel ``[in, out]``) are the
only transformation; dtypes are never changed, so HF -> Flax -> HF is
byte-identical.

Whole-model helpers::

    model = load_hf_state_dict_into_model(model, tensors)   # tensors: Mapping[str, np.ndarray] (may be lazy)
    hf = model_to_hf_state_dict(model, dtype=None)          # {hf_name: np.ndarray}, HF layouts

``load_hf_state_dict_into_model`` works on concrete models (updated in place)
and on abstract ones from ``sgtv_jax.models.build_abstract_model`` (values
filled in); it returns the model either way. Tensors are fetched from the
mapping one at a time, so a lazy safetensors-backed mapping never has to be
materialised whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from sgtv_jax.models.common import FamilyModel

from ._base import FlaxPath, NameMap, Rule

__all__ = ["FlaxPath", "NameMap", "Rule", "get_name_map", "load_hf_state_dict_into_model", "model_to_hf_state_dict"]


def get_name_map(model_type: str) -> NameMap:
    """Name map for an HF ``model_type`` (``convert.architectures``); ConvertError listing the supported ones."""
    # Imported here: the registry imports this package's per-family modules.
    from convert.architectures import get_architecture

    return get_architecture(model_type).name_map


def load_hf_state_dict_into_model(
    model: FamilyModel, tensors: Mapping[str, np.ndarray], *, strict: bool = True
) -> nnx.Module:
    """Load HF-named tensors into ``model`` (concrete or abstract); returns the model.

    See ``NameMap.load_hf_state_dict_into_model``; the map is chosen from
    ``model.config.model_type``.
    """
    return get_name_map(model.config.model_type).load_hf_state_dict_into_model(model, tensors, strict=strict)


def model_to_hf_state_dict(model: FamilyModel, dtype: Any = None) -> dict[str, np.ndarray]:
    """All parameters as ``{hf_name: np.ndarray}`` in HF layout (see ``NameMap.model_to_hf_state_dict``)."""
    return get_name_map(model.config.model_type).model_to_hf_state_dict(model, dtype=dtype)
