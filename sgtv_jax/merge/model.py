"""Whole-model merges: map a tensor-level method over every tensor of a model.

Models are pytrees of arrays (a flat dict `name -> array`, nested dicts, Flax
NNX states, ...) with the same tensor names. A tensor's name is its key for
flat dicts, else the pytree path joined with "." (e.g. `layers.0.kernel`).

Parameters can vary per model and per tensor:

* per-model parameters (`weights`, `densities`, `gamma`, `epsilon`): a sequence
  with one entry per fine-tuned model, or one entry broadcast to all;
* every entry, and every method parameter (`normalize`, `trim`, `lambda_`, ...),
  is a *spec*: a plain value, a callable `name -> value`, or mergekit-style
  filter rules `[{"filter": "mlp", "value": 0.5}, {"value": 0.0}]` (the first
  rule whose `filter` is a substring of the name wins; a rule without `filter`
  matches everything).

Everything is validated before any tensor is merged: missing / extra tensors
and shape mismatches (all names listed), NaN/Inf in any model, parameter
lengths and ranges, and calibration statistics missing for a data-aware trim.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax import _checks
from sgtv_jax.merge import _validate
from sgtv_jax.merge.keys import tensor_key
from sgtv_jax.merge.registry import get_method
from sgtv_jax.merge.trim import DATA_TRIMS, Calibration, missing_stats_message

PER_MODEL = ("weights", "densities", "gamma", "epsilon")
LAYOUTS = ("torch", "flax")


# --------------------------------------------------------------------------- specs


def _is_rules(spec: Any) -> bool:
    return isinstance(spec, (list, tuple)) and len(spec) > 0 and all(isinstance(r, Mapping) for r in spec)


def resolve(spec: Any, name: str) -> Any:
    """The value of a parameter spec for tensor `name` (plain value, callable or filter rules)."""
    if callable(spec):
        return spec(name)
    if _is_rules(spec):
        for rule in spec:
            if "value" not in rule:
                raise ValueError(f"filter rule {dict(rule)!r} has no 'value'")
            filt = rule.get("filter")
            if filt is None or str(filt) in name:
                return rule["value"]
        raise ValueError(f"no filter rule matches tensor {name!r} in {list(spec)!r} (add a rule without 'filter')")
    return spec


def _per_model(spec: Any, tasks: int, what: str, name: str) -> list[Any]:
    if isinstance(spec, (list, tuple)) and not _is_rules(spec):
        entries = list(spec)
    elif hasattr(spec, "shape") and len(spec.shape) == 1:
        entries = list(np.asarray(spec))
    else:
        return [resolve(spec, name)] * tasks
    if len(entries) != tasks:
        raise ValueError(f"{what} has {len(entries)} entries but there are {tasks} fine-tuned models")
    return [resolve(e, name) for e in entries]


# --------------------------------------------------------------------------- pytrees


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def named_leaves(tree: Any) -> tuple[dict[str, Any], Any, list[str]]:
    """`({name: leaf}, treedef, names in leaf order)` of a pytree of arrays."""
    if isinstance(tree, Mapping) and all(not isinstance(v, Mapping) for v in tree.values()):
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(dict(tree))
        names = [str(p[0].key) for p, _ in leaves_with_path]
    else:
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
        names = [".".join(_key_str(k) for k in p) for p, _ in leaves_with_path]
    leaves = {n: leaf for n, (_, leaf) in zip(names, leaves_with_path)}
    if len(leaves) != len(names):
        raise ValueError("tensor names are not unique after flattening the model pytree")
    return leaves, treedef, names


def _check_models(base: dict, models: list[dict]) -> None:
    problems = []
    for i, m in enumerate(models):
        missing = sorted(set(base) - set(m))
        extra = sorted(set(m) - set(base))
        if missing:
            problems.append(f"model {i} is missing tensors {missing}")
        if extra:
            problems.append(f"model {i} has tensors the base model lacks: {extra}")
        shapes = [
            f"{n!r} {tuple(np.shape(m[n]))} vs base {tuple(np.shape(base[n]))}"
            for n in base if n in m and tuple(np.shape(m[n])) != tuple(np.shape(base[n]))
        ]
        if shapes:
            problems.append(f"model {i} has tensors of different shapes: " + ", ".join(shapes))
    if problems:
        raise ValueError("models do not match the base model: " + "; ".join(problems))


def _check_finite(base: dict, models: list[dict], names: list[str]) -> None:
    bad = []
    for n in names:
        for label, tree in [("base", base)] + [(f"model {i}", m) for i, m in enumerate(models)]:
            a = jnp.asarray(tree[n])
            if jnp.issubdtype(a.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(a))):
                bad.append(f"{label} tensor {n!r} ({int(jnp.sum(~jnp.isfinite(a)))} entries)")
    if bad:
        raise ValueError("NaN or Inf in " + ", ".join(bad))


# --------------------------------------------------------------------------- merge


def _method_params(fn: Callable) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _stat(stats: Mapping[str, Any] | None, name: str) -> Any:
    if stats is None:
        return None
    value = stats.get(name)
    return None if value is None else _checks.as_array(value, f"statistics of {name!r}")


def merge(
    method: str,
    base: Any,
    models: Sequence[Any],
    *,
    weights: Any = None,
    densities: Any = None,
    gamma: Any = None,
    epsilon: Any = None,
    hessians: Mapping[str, Any] | None = None,
    hessian_invs: Mapping[str, Any] | None = None,
    norms: Mapping[str, Any] | None = None,
    layout: Any = "torch",
    seed: int | jax.Array = 0,
    **params: Any,
) -> Any:
    """Merge fine-tuned `models` into `base` with `method` (see `available_methods()`).

    Args:
      method: a name from `sgtv_jax.merge.registry.METHODS`.
      base: the base model `theta_0` (pytree of arrays).
      models: the fine-tuned models `theta_t`, same tensor names and shapes.
      weights, densities, gamma, epsilon: per-model parameters (specs, see module
        doc); weights default to 1 each, densities to 1 (no trimming).
      hessians: `name -> H` `[in, in]` (shared) or `[T, in, in]` (per model), the
        calibration statistics for `trim="sparsegpt"` / `"wanda"` and regmean's
        Grams; `hessian_invs`: full inverse Hessians instead (sparsegpt only);
        `norms`: `name -> [in]` / `[T, in]` input norms for wanda.
      layout: spec, "torch" (`[out, in]`, default) or "flax" (`[in, out]`
        kernels; transposed around the method, so row-wise trims and OBS work
        per output feature).
      seed: int or PRNG key; tensor `name` uses `keys.tensor_key(seed, name)`,
        so the result is bit-identical for a seed whatever the visiting order.
      **params: method parameters (specs), e.g. `normalize`, `lambda_` (or
        `"lambda"` via `**{"lambda": 0.5}`), `trim`, `rescale`, `alpha`.
    Returns:
      The merged model, same pytree structure and dtypes as `base`
      (non-floating tensors are copied from `base`).
    """
    fn = get_method(method)
    accepted = _method_params(fn)
    defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()}
    if "lambda" in params:
        params["lambda_"] = params.pop("lambda")
    unknown = sorted(set(params) - (accepted - {"deltas", "weights", "densities", "key", "calib", "grams", "base", "name"}))
    if unknown:
        allowed = sorted(accepted - {"deltas", "weights", "densities", "key", "calib", "grams", "base", "name"})
        raise ValueError(f"method {method!r} has no parameter(s) {unknown}; its parameters: {allowed}")
    per_model = {"weights": weights, "densities": densities, "gamma": gamma, "epsilon": epsilon}
    for p, v in per_model.items():
        if v is not None and p not in accepted:
            raise ValueError(f"method {method!r} takes no {p!r}")
    if isinstance(models, Mapping) or not isinstance(models, Sequence) or len(models) == 0:
        raise ValueError("models must be a non-empty sequence of fine-tuned models")
    tasks = len(models)

    base_leaves, treedef, names = named_leaves(base)
    model_leaves = [named_leaves(m)[0] for m in models]
    _check_models(base_leaves, model_leaves)
    _check_finite(base_leaves, model_leaves, names)

    # ---- plan: resolve and validate every tensor's parameters before merging anything
    plan, missing_stats, problems = {}, [], []
    for name in names:
        b = jnp.asarray(base_leaves[name])
        if not jnp.issubdtype(b.dtype, jnp.floating):
            continue
        try:
            kw = {p: resolve(v, name) for p, v in params.items()}
            for p, v in per_model.items():
                if p in accepted and (v is not None or p == "weights"):
                    vals: Sequence[Any] = _per_model(1.0 if v is None else v, tasks, p, name)
                    vals = _validate.per_task(vals, tasks, p, name)
                    if p == "densities":
                        _validate.in_range(vals, 0.0, 1.0, p, name)
                    kw[p] = list(vals)
            lay = resolve(layout, name)
            if lay not in LAYOUTS:
                raise ValueError(f"layout must be one of {LAYOUTS}, got {lay!r} for tensor {name!r}")
            transpose = lay == "flax" and b.ndim == 2
            cols = (b.shape[0] if transpose else b.shape[-1]) if b.ndim == 2 else None
            calib = Calibration(_stat(hessians, name), _stat(hessian_invs, name), _stat(norms, name))
            for label, stat, nd in (("hessians", calib.hessian, 2), ("hessian_invs", calib.hessian_inv, 2), ("norms", calib.norms, 1)):
                if stat is None:
                    continue
                want = [(cols,) * nd, (tasks,) + (cols,) * nd] if cols else []
                if tuple(stat.shape) not in want:
                    raise ValueError(
                        f"{label}[{name!r}] has shape {tuple(stat.shape)}; expected one of {want} "
                        f"for a tensor of shape {tuple(b.shape)} (layout {lay!r})"
                    )
            trim = kw.get("trim", defaults.get("trim"))
            if "key" in accepted:
                kw["key"] = tensor_key(seed, name)
            if "calib" in accepted:
                if trim in DATA_TRIMS and b.ndim != 2:
                    raise ValueError(
                        f"trim={trim!r} needs 2-D linear weights, but tensor {name!r} has shape "
                        f"{tuple(b.shape)}; give it a data-free trim with a per-tensor trim spec"
                    )
                if trim in DATA_TRIMS:
                    has = calib.hessian is not None or (
                        calib.hessian_inv is not None if trim == "sparsegpt" else calib.norms is not None
                    )
                    if not has:
                        missing_stats.append(name)
                kw["calib"] = calib
            if trim == "magprune":
                eps = kw.get("epsilon", defaults["epsilon"])
                eps = _validate.per_task(eps, tasks, "epsilon", name)
                for i, (d, e) in enumerate(zip(kw.get("densities", [1.0] * tasks), eps)):
                    if 0.0 < d < 1.0 and not (d - e > 0.0 and d + e < 1.0):
                        raise ValueError(
                            f"magprune (DELLA) needs 0 < density - epsilon and density + epsilon < 1; "
                            f"model {i} has density {d}, epsilon {e} for tensor {name!r}"
                        )
            if "grams" in accepted:
                kw["grams"] = calib.hessian
            if "base" in accepted:  # methods on whole weights (slerp, karcher, ...) and linear's sum
                kw["base"] = b.T if transpose else b
            kw["name"] = name
            plan[name] = (kw, transpose)
        except ValueError as e:
            problems.append(str(e))
    if missing_stats:
        trims = sorted({str(resolve(params.get("trim"), n)) for n in missing_stats})
        problems.append(
            f"{len(missing_stats)} tensor(s) have no calibration statistics for trim "
            f"{'/'.join(trims)}: {missing_stats}. "
            + missing_stats_message(trims[0] if len(trims) == 1 else "sparsegpt", None)
            + " (a per-tensor trim spec such as [{'filter': 'kernel', 'value': 'sparsegpt'}, "
            "{'value': 'magnitude'}] trims the others without data)"
        )
    if problems:
        raise ValueError("invalid merge: " + "; ".join(problems))

    # ---- merge tensor by tensor
    out = []
    for name in names:
        b = jnp.asarray(base_leaves[name])
        if name not in plan:
            out.append(base_leaves[name])
            continue
        kw, transpose = plan[name]
        dt = _validate.work_dtype(b.dtype)
        deltas = jnp.stack([jnp.asarray(m[name]).astype(dt) for m in model_leaves]) - b.astype(dt)
        if transpose:
            deltas = jnp.swapaxes(deltas, 1, 2)
        merged = fn(deltas, **kw)
        if transpose:
            merged = merged.T
        out.append((b.astype(merged.dtype) + merged).astype(b.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
