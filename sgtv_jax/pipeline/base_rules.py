"""What a config's `base_model` is to a method that may go without one (mergekit's rules).

`MethodSpec.base_optional` methods accept a config without `base_model`: the
first listed model is then read as the base (shapes, config, tokenizer) and
stays one of the merged models (its task vector is zero). What the base is
when one *is* given depends on the method, as in mergekit:

- linear: a listed base is one of the averaged models (its weight counts);
- karcher (`MethodSpec.base_point`): the base is one more point of the mean,
  added with weight 1 when `models` does not list it (mergekit gathers the
  base model's tensor with the others);
- multislerp (a `whole_weights` parameter): the base is the origin the task
  vectors are taken from and is not merged; without `base_model` the method
  interpolates the weights themselves (`whole_weights` set here).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

from sgtv_jax.merge.specs import MethodSpec

Entry = TypeVar("Entry")


def base_may_be_listed(spec: MethodSpec | None, given: bool) -> bool:
    """Whether `models` may list the base model: it is merged like the others then.

    True for a base-optional method without `base_model` (the first model is the
    base) and, with one, unless the method takes the base as its origin (multislerp).
    """
    if spec is None or not spec.base_optional:
        return False
    return not given or spec.param("whole_weights") is None


def model_entries(
    spec: MethodSpec | None,
    base_written: Any,
    base: str,
    models: list[Any],
    make: Callable[[int, Any, str], Entry | None],
) -> list[Entry]:
    """The entries of `models` (`make(i, raw, not_base)`, which refuses a model equal to `not_base`).

    Adds the base model as one more model when `spec.base_point` and `models`
    does not list it. `base_written`: the config's `base_model` (None when
    left out); `base`: the resolved base path.
    """
    given = base_written is not None
    not_base = "" if base_may_be_listed(spec, given) else base
    entries = [e for i, m in enumerate(models) if (e := make(i, m, not_base)) is not None]
    if spec is None or not spec.base_point or not given or not base:
        return entries
    if any(getattr(e, "model", None) == base and not getattr(e, "adapter", "") for e in entries):
        return entries
    extra = make(len(models), {"model": base_written}, "")
    return entries + ([extra] if extra is not None else [])


def whole_weights(spec: MethodSpec | None, given: bool, gparams: MutableMapping[str, Any], problems: list[str]) -> None:
    """Without `base_model`, a method with `whole_weights` interpolates the weights: set it (an explicit false is refused)."""
    if spec is None or given or spec.param("whole_weights") is None:
        return
    if gparams.get("whole_weights", True) is not True:
        problems.append(
            f"parameters.whole_weights is false but base_model is left out: merge_method {spec.name!r} "
            "then interpolates the models' weights (give base_model to merge task vectors)"
        )
        return
    gparams["whole_weights"] = True
