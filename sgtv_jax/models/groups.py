"""Input groups: the linear layers of a block that read one captured input, so one Hessian serves them.

A family declares its groups per config (`family.input_groups(config)`), as
plain name tuples (`("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")`:
the input is captured under the first name) or as `InputGroup`s when the
input sits under another capture key or its tokens carry weights. A routed
expert's gate and up projections, for example::

    InputGroup(("mlp.experts.3.gate_proj", "mlp.experts.3.up_proj"),
               key="mlp.experts", weights_key="mlp.routing_weights", column=3)

read the experts' shared input ``caps["mlp.experts"]`` ``[B, S, D]``, each
token weighted by its routing weight to expert 3,
``caps["mlp.routing_weights"][..., 3]`` (0 for tokens routed elsewhere).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax


@dataclasses.dataclass(frozen=True)
class InputGroup:
    """Linear layers sharing one input and, optionally, per-token weights.

    names: HF-local names of the linear layers (block-relative, e.g. ``self_attn.q_proj``).
    key: capture key of the input ``[B, S, in]``; None: ``names[0]``.
    weights_key: capture key of per-token weights ``[B, S, C]``; None: every token weighs 1.
    column: the column of ``caps[weights_key]`` that weights this group (an expert's index).
    """

    names: tuple[str, ...]
    key: str | None = None
    weights_key: str | None = None
    column: int | None = None

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("an InputGroup needs at least one linear layer name")
        if (self.weights_key is None) != (self.column is None):
            raise ValueError(
                f"InputGroup {self.names!r}: weights_key and column go together, "
                f"got weights_key={self.weights_key!r}, column={self.column!r}"
            )

    @property
    def input_key(self) -> str:
        """The capture key of the group's input."""
        return self.key if self.key is not None else self.names[0]

    @property
    def weighted(self) -> bool:
        """Whether tokens carry weights (a routed expert)."""
        return self.weights_key is not None

    def inputs(self, caps: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
        """``(input [B, S, in], token weights [B, S] or None)`` from a block's captures."""
        x = caps[self.input_key]
        if self.weights_key is None:
            return x, None
        return x, caps[self.weights_key][..., self.column]


def as_input_group(g: InputGroup | Sequence[str]) -> InputGroup:
    """A declared group as an `InputGroup` (a plain name tuple: input captured under its first name)."""
    if isinstance(g, InputGroup):
        return g
    if isinstance(g, str):
        raise TypeError(f"an input group is a tuple of linear layer names, got the string {g!r}")
    return InputGroup(tuple(g))
