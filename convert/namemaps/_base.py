"""Table-driven HF <-> Flax NNX name map shared by all families.

A family describes, for a given model config, every parameter tensor as a
``Rule(hf_name, flax_path, transpose, hf_shape)``. From that table this module
derives the per-tensor streaming functions (``hf_to_flax``, ``flax_to_hf``),
the checkpoint validator (``expected_hf_tensors``, ``check_hf_tensor``) and the
whole-model helpers. Arrays are numpy (any dtype, incl. ``ml_dtypes.bfloat16``);
transposes are the only transformation, so values and dtype survive a round
trip bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

FlaxPath = tuple[Any, ...]  # e.g. ("blocks", 3, "self_attn", "q_proj", "kernel")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter tensor: HF name and layout vs Flax path and layout."""

    hf_name: str
    flax_path: FlaxPath
    transpose: bool  # True for nn.Linear weights: HF [out, in] <-> Flax kernel [in, out]
    hf_shape: tuple[int, ...]

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape


def _transpose(a: np.ndarray) -> np.ndarray:
    # Contiguous copy so a later .tobytes()/safetensors write sees plain row-major data.
    return np.ascontiguousarray(np.asarray(a).T)


class NameMap:
    """Name map of one architecture family.

    Args:
      family: name used in messages.
      rules_fn: ``config -> Iterable[Rule]`` (config: our frozen dataclass).
      normalize_fn: maps alternative HF spellings (e.g. ``bert.`` prefix) to
        the canonical name, or returns the name unchanged.
      ignore_patterns: regexes (on the canonical name) of tensors that are not
        parameters of the Flax model (buffers, heads we do not model).
      config_fn: ``hf_or_our_config -> our config``.
    """

    def __init__(
        self,
        family: str,
        rules_fn: Callable[[Any], Iterable[Rule]],
        normalize_fn: Callable[[str], str],
        ignore_patterns: Iterable[str],
        config_fn: Callable[[Any], Any],
    ):
        self.family = family
        self._rules_fn = rules_fn
        self._normalize = normalize_fn
        self._ignore = [re.compile(p) for p in ignore_patterns]
        self._config_fn = config_fn
        # Per instance (not a method decorator, whose cache would be shared by all maps and keep them alive).
        self._tables = functools.lru_cache(maxsize=32)(self._build_tables)

    # -- tables ---------------------------------------------------------------
    def _build_tables(self, cfg: Any) -> tuple[dict[str, Rule], dict[FlaxPath, Rule]]:
        by_hf: dict[str, Rule] = {}
        by_flax: dict[FlaxPath, Rule] = {}
        for r in self._rules_fn(cfg):
            by_hf[r.hf_name] = r
            by_flax[r.flax_path] = r
        return by_hf, by_flax

    def config(self, config: Any) -> Any:
        return self._config_fn(config)

    def rules(self, config: Any) -> list[Rule]:
        """All parameter rules for ``config`` (HF checkpoint order)."""
        return list(self._tables(self.config(config))[0].values())

    def expected_hf_tensors(self, config: Any) -> dict[str, tuple[int, ...]]:
        """``{hf_name: hf_shape}`` of every tensor a checkpoint must provide."""
        return {r.hf_name: r.hf_shape for r in self.rules(config)}

    def canonical_name(self, name: str) -> str:
        return self._normalize(name)

    def is_ignored(self, name: str, config: Any) -> bool:
        """True for tensors that are not Flax parameters (buffers, tied lm_head copies, ...)."""
        canon = self._normalize(name)
        by_hf, _ = self._tables(self.config(config))
        if canon in by_hf:
            return False
        return any(p.search(canon) for p in self._ignore)

    # -- per tensor -------------------------------------------------------------
    def rule_for_hf(self, name: str, config: Any) -> Rule | None:
        """Rule of an HF tensor, None if it is ignorable; ValueError if unknown."""
        canon = self._normalize(name)
        by_hf, _ = self._tables(self.config(config))
        rule = by_hf.get(canon)
        if rule is not None:
            return rule
        if any(p.search(canon) for p in self._ignore):
            return None
        raise ValueError(f"{self.family}: unexpected tensor {name!r} (not a parameter of this architecture/config)")

    def check_hf_tensor(self, name: str, shape: tuple[int, ...], config: Any) -> Rule | None:
        """Validate one tensor's shape against the config (ValueError naming both shapes)."""
        rule = self.rule_for_hf(name, config)
        if rule is not None and tuple(shape) != rule.hf_shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(shape)} but the config expects {rule.hf_shape}")
        return rule

    def hf_to_flax(self, name: str, array: np.ndarray, config: Any) -> tuple[FlaxPath, np.ndarray] | None:
        """HF tensor -> ``(flax_path, array in Flax layout)``; None for ignorable tensors.

        Shape is validated (ValueError naming the tensor and both shapes).
        dtype is kept.
        """
        rule = self.check_hf_tensor(name, np.shape(array), config)
        if rule is None:
            return None
        return rule.flax_path, (_transpose(array) if rule.transpose else np.asarray(array))

    def flax_to_hf(self, flax_path: FlaxPath, array: np.ndarray, config: Any) -> tuple[str, np.ndarray]:
        """Flax parameter -> ``(hf_name, array in HF layout)``; dtype kept."""
        _, by_flax = self._tables(self.config(config))
        rule = by_flax.get(tuple(flax_path))
        if rule is None:
            raise ValueError(f"{self.family}: no HF tensor for Flax path {tuple(flax_path)!r}")
        if tuple(np.shape(array)) != rule.flax_shape:
            raise ValueError(
                f"Flax parameter {tuple(flax_path)!r} has shape {tuple(np.shape(array))} "
                f"but the config expects {rule.flax_shape} (HF {rule.hf_name!r})"
            )
        arr = _transpose(array) if rule.transpose else np.ascontiguousarray(np.asarray(array))
        return rule.hf_name, arr

    def hf_name_to_flax_path(self, name: str, config: Any) -> FlaxPath | None:
        rule = self.rule_for_hf(name, config)
        return None if rule is None else rule.flax_path

    def flax_path_to_hf_name(self, flax_path: FlaxPath, config: Any) -> str:
        _, by_flax = self._tables(self.config(config))
        rule = by_flax.get(tuple(flax_path))
        if rule is None:
            raise ValueError(f"{self.family}: no HF tensor for Flax path {tuple(flax_path)!r}")
        return rule.hf_name

    # -- whole model ------------------------------------------------------------
    def load_hf_state_dict_into_model(
        self, model: Any, tensors: Mapping[str, np.ndarray], *, strict: bool = True
    ) -> Any:
        """Load HF-named tensors into ``model`` (concrete or abstract); returns the model.

        Tensors are fetched one at a time (``tensors`` may be lazy). Every
        shape is checked against ``model.config`` (ValueError naming the tensor
        and both shapes); unknown names raise ValueError; ignorable ones
        (buffers, a tied ``lm_head.weight``) are skipped. Values are cast to
        each parameter's dtype (bf16 -> f32 is exact). With ``strict``, a
        parameter that no tensor provided is an error naming its HF name.
        """

        cfg = model.config
        params = _flat_params(model)
        filled: set[FlaxPath] = set()
        for name in tensors.keys():
            if self.is_ignored(name, cfg):
                continue
            shape = _cheap_shape(tensors, name)
            if shape is not None:  # fail before reading the data when the reader can tell
                self.check_hf_tensor(name, shape, cfg)
            res = self.hf_to_flax(name, tensors[name], cfg)  # validates the shape again
            if res is None:
                continue
            path, arr = res
            var = params.get(path)
            if var is None:
                raise ValueError(f"tensor {name!r} maps to {path!r}, which the model does not have")
            var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))
            filled.add(path)
        if strict:
            missing = [self.flax_path_to_hf_name(p, cfg) for p in params if p not in filled]
            if missing:
                raise ValueError(
                    f"checkpoint lacks {len(missing)} tensor(s) the model needs: "
                    f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
                )
        return model

    def model_to_hf_state_dict(self, model: Any, dtype: Any = None) -> dict[str, np.ndarray]:
        """All parameters as ``{hf_name: np.ndarray}`` in HF layout and checkpoint order.

        ``dtype`` (e.g. ``ml_dtypes.bfloat16``) casts on the way out; default
        keeps each parameter's dtype.
        """
        return dict(self.hf_tensors(model, dtype))

    def hf_tensors(
        self, model: Any, dtype: Any = None, error: type[Exception] = ValueError
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_name, array)`` for every parameter, in HF layout and checkpoint order, one at a time.

        ``dtype`` casts on the way out (default: the parameter's dtype); a rule
        the model has no parameter for raises ``error``.
        """
        cfg = model.config
        params = _flat_params(model)
        for rule in self.rules(cfg):
            var = params.get(rule.flax_path)
            if var is None:
                raise error(f"model has no parameter {rule.flax_path!r} (HF {rule.hf_name!r})")
            arr = np.asarray(var.get_value())
            if dtype is not None:
                arr = arr.astype(dtype)
            yield self.flax_to_hf(rule.flax_path, arr, cfg)


def _flat_params(model: Any) -> dict[FlaxPath, Any]:

    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _cheap_shape(tensors: Mapping[str, Any], name: str) -> tuple[int, ...] | None:
    """Shape without reading data, when the mapping offers ``shape(name)`` (lazy readers); else None."""
    fn = getattr(tensors, "shape", None)
    if callable(fn):
        try:
            return tuple(fn(name))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
    return None


Entry = tuple[str, str, bool, tuple[int, ...]]  # (hf_local_name, flax_leaf, transpose, hf_shape) of `block_rules`


def dense(module: str, hf_shape: tuple[int, int], transpose: bool) -> list[Entry]:
    """`block_rules` entries of a layer's ``weight`` (`hf_shape`) and its ``bias`` (the output size).

    ``transpose``: an nn.Linear ``[out, in]``; else a GPT-2 Conv1D ``[in, out]``.
    """
    out = hf_shape[0] if transpose else hf_shape[1]
    return [(f"{module}.weight", "kernel", transpose, hf_shape), (f"{module}.bias", "bias", False, (out,))]


def layer_norm(module: str, dim: int) -> list[Entry]:
    """`block_rules` entries of a LayerNorm's ``weight`` (Flax ``scale``) and ``bias``, both ``[dim]``."""
    return [(f"{module}.weight", "scale", False, (dim,)), (f"{module}.bias", "bias", False, (dim,))]


def block_rules(prefix: str, flax_prefix: FlaxPath, entries: Iterable[Entry]) -> list[Rule]:
    """Rules for ``(hf_local_name, flax_leaf, transpose, hf_shape)`` entries under a prefix.

    ``hf_local_name`` like ``"self_attn.q_proj.weight"``; its module part is
    split on dots to form the Flax path, with ``flax_leaf`` as last element.
    """
    out = []
    for local, leaf, transpose, shape in entries:
        module = tuple(local.split(".")[:-1])
        out.append(Rule(prefix + local, flax_prefix + module + (leaf,), transpose, tuple(shape)))
    return out


MODULE_FUNCTIONS = ("hf_to_flax", "flax_to_hf", "expected_hf_tensors", "check_hf_tensor", "is_ignored")


def module_getattr(name_map: NameMap, module: str) -> Callable[[str], Any]:
    """A family module's ``__getattr__`` (PEP 562): its `MODULE_FUNCTIONS` are `name_map`'s methods."""

    def __getattr__(name: str) -> Any:
        if name in MODULE_FUNCTIONS:
            return getattr(name_map, name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
