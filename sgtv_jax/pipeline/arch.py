"""Architecture plumbing of the block-by-block merge: one `Arch` per base checkpoint.

Built from the architecture registry (`convert.architectures.get_architecture`):
the Flax family, its name map and the abstract block template turn HF-named
tensors into block states (`block_state`) or a model with real embeddings
(`outer_model`); `layout` sorts a checkpoint's tensor names into blocks and
the rest; `input_groups` are the family's declared linear layers sharing one
input (q/k/v, gate/up; a routed expert's layers with their token weights:
`sgtv_jax.models.groups.InputGroup`), so one Hessian serves each group.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.architectures import get_architecture
from convert.readers import hf_config_object
from sgtv_jax.models import build_abstract_model, split_block
from sgtv_jax.models.groups import InputGroup, as_input_group
from sgtv_jax.pipeline.config import ConfigError


class TensorLayout(NamedTuple):
    """A checkpoint's tensors: outside the blocks (`outer`), per block (`blocks[i]`), name-map rules."""

    outer: list[str]
    blocks: list[list[str]]
    rules: dict[str, Any]


@dataclasses.dataclass
class Arch:
    """Everything architecture-specific, from the base config."""

    model_type: str
    hf_config: dict[str, Any]
    hf_obj: Any
    name_map: Any
    family: Any
    num_layers: int
    graphdefs: list[Any]  # per block: gemma's sliding / full layers differ in static attributes
    template: Any  # FlatState of block 0 (abstract; every block has the same parameters)
    input_groups: tuple[InputGroup, ...] | None  # None: the family declares none (no calibrated trims)

    def prefix(self, i: int) -> str:
        return self.family.hf_block_prefix(i)

    def graphdef(self, i: int) -> Any:
        """Block i's graph definition (blocks of one layer type share one, so one compilation)."""
        return self.graphdefs[i]

    def require_input_groups(self) -> tuple[InputGroup, ...]:
        """The input groups, or ConfigError when this architecture has none (calibrated trims)."""
        if self.input_groups is None:
            raise ConfigError(
                f"calibrated trims (sparsegpt, wanda) and regmean are not supported for {self.model_type} "
                f"checkpoints: the {self.family.__name__} family declares no input groups for its linear "
                "layers; use a data-free trim (magnitude, random, ...)"
            )
        return self.input_groups

    def abstract_model(self) -> Any:
        return build_abstract_model(self.hf_obj)

    def block_state(self, i: int, tensors: dict[str, np.ndarray]) -> Any:
        """`nnx.State` of block i from its HF-named tensors (float32)."""
        vals = {}
        for name, arr in tensors.items():
            res = self.name_map.hf_to_flax(name, arr, self.hf_obj)
            if res is None:
                continue
            path, a = res
            vals[tuple(path[2:])] = a
        flat = []
        for path, var in self.template:
            if path not in vals:
                raise ConfigError(f"block {i}: no tensor for parameter {path!r}")
            flat.append((path, var.replace(jnp.asarray(vals[path], jnp.float32))))
        return nnx.from_flat_state(flat)

    def outer_model(self, tensors: dict[str, np.ndarray]) -> Any:
        """A model whose non-block parameters are `tensors` (blocks stay abstract): for `embed`."""
        model = self.abstract_model()
        self.name_map.load_hf_state_dict_into_model(model, tensors, strict=False)
        return model

    def layout(self, names: list[str]) -> TensorLayout:
        """Sort tensor `names` into blocks and the rest (tensors without a name-map rule are left out)."""
        rules = {n: self.name_map.rule_for_hf(n, self.hf_obj) for n in names}
        prefixes = [self.prefix(i) for i in range(self.num_layers)]
        blocks = [[n for n in names if n.startswith(p) and rules[n] is not None] for p in prefixes]
        in_blocks = {n for bn in blocks for n in bn}
        outer = [n for n in names if n not in in_blocks and rules[n] is not None]
        return TensorLayout(outer, blocks, rules)


def declared_input_groups(family: Any, config: Any, linear_names: tuple[str, ...]) -> tuple[InputGroup, ...] | None:
    """The family's `input_groups(config)` as `InputGroup`s, checked to partition the block's `linear_names`."""
    declared = family.input_groups(config)
    if declared is None:
        return None
    groups = tuple(as_input_group(g) for g in declared)
    flat = [n for g in groups for n in g.names]
    if not groups or sorted(flat) != sorted(linear_names):
        names = [g.names for g in groups]
        raise ValueError(
            f"{family.__name__}.input_groups {names!r} must list each of its linear layers "
            f"{tuple(linear_names)!r} exactly once"
        )
    return groups


def arch_of(base_ckpt: Any) -> Arch:
    """The `Arch` of an open base checkpoint (its `config.json`)."""
    cfg = dict(base_ckpt.config)
    mt = cfg["model_type"]
    row = get_architecture(mt)
    obj = hf_config_object(cfg)
    model = build_abstract_model(obj)
    graphdefs = [split_block(model, i)[0] for i in range(len(model.blocks))]
    state = split_block(model, 0)[1]
    groups = declared_input_groups(row.family, model.config, tuple(model.linear_names))
    return Arch(
        mt, cfg, obj, row.name_map, row.family, len(model.blocks), graphdefs, list(nnx.to_flat_state(state)), groups
    )
