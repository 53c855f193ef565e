"""Whole-model merges: every tensor of a model planned (`TensorPlan`), then merged by `merge_planned`.

Models are pytrees of arrays (a flat dict `name -> array`, nested dicts, Flax
NNX states, ...) with the same tensor names. A tensor's name is its key for
flat dicts, else the pytree path joined with "." (e.g. `layers.0.kernel`).

Parameters can vary per model and per tensor:

* per-model parameters (`weights`, `densities`, `gamma`, `epsilon`): a sequence
  with one entry per fine-tuned model, or one entry broadcast to all; a model
  whose entry is None takes the method's default;
* every entry, every method parameter (`normalize`, `lambda_`, ...) and the
  trim options (`trim`, `blocksize`, `percdamp`, `prunen`, `prunem`, `refit`)
  is a *spec* (`sgtv_jax.merge.paramspec`): a plain value, a callable
  `name -> value`, mergekit-style filter rules
  `[{"filter": "mlp", "value": 0.5}, {"value": 0.0}]`, or a gradient over the
  decoder blocks when `block_of` says which block a tensor is in.

Everything is validated before any tensor is merged: missing / extra tensors
and shape mismatches (all names listed), NaN/Inf in any model, parameter
lengths and ranges, trim and OBS options, and calibration statistics missing
for a data-aware trim. Each tensor is then merged by
`sgtv_jax.merge.plan.merge_planned`, the function the YAML pipeline uses too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax import _checks
from sgtv_jax.merge.paramspec import SpecError, per_model, resolve, split_per_model
from sgtv_jax.merge.plan import ObsOptions, TensorPlan, merge_planned
from sgtv_jax.merge.specs import PER_MODEL_PARAMS, MethodSpec, call_args, method_spec
from sgtv_jax.merge.trim import DATA_TRIMS, TRIMS, Calibration, missing_stats_message

__all__ = ["LAYOUTS", "merge", "named_leaves", "resolve"]

LAYOUTS = ("torch", "flax")
_PER_MODEL = {ps.keyword: ps for ps in PER_MODEL_PARAMS}  # weights, densities, gamma, epsilon
_TRIM_OPTIONS = ("trim",) + ObsOptions._fields  # options of methods that trim


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
    base_shapes = {n: tuple(np.shape(v)) for n, v in base.items()}
    for i, m in enumerate(models):
        model_shapes = {n: tuple(np.shape(v)) for n, v in m.items()}
        missing, extra, differ = _checks.tensor_mismatch(base_shapes, model_shapes)
        if missing:
            problems.append(f"model {i} is missing tensors {missing}")
        if extra:
            problems.append(f"model {i} has tensors the base model lacks: {extra}")
        shapes = [f"{n!r} {model_shapes[n]} vs base {base_shapes[n]}" for n in differ]
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


# --------------------------------------------------------------------------- planning


class _Planned(NamedTuple):
    """One tensor ready to merge: its plan, statistics and whether it is a transposed flax kernel."""

    plan: TensorPlan
    calib: Calibration
    transpose: bool


class _Inputs(NamedTuple):
    """The arguments of `merge` every tensor's plan is resolved from."""

    spec: MethodSpec
    tasks: int
    per_model: dict[str, list[Any]]  # keyword -> one spec per model (None: the default)
    params: dict[str, Any]  # method keyword -> spec
    options: dict[str, Any]  # trim / ObsOptions field -> spec (given ones only)
    stats: dict[str, Mapping[str, Any] | None]
    layout: Any
    seed: int | jax.Array
    block_of: Callable[[str], int | None] | None
    num_layers: int | None


def _stat(stats: Mapping[str, Any] | None, name: str) -> Any:
    if stats is None:
        return None
    value = stats.get(name)
    return None if value is None else _checks.as_array(value, f"statistics of {name!r}")


def _calibration(inp: _Inputs, name: str, shape: tuple[int, ...], lay: str, cols: int | None) -> Calibration:
    """The tensor's statistics, each checked against its input width `cols`."""
    calib = Calibration(*(_stat(inp.stats[k], name) for k in ("hessians", "hessian_invs", "norms")))
    for label, stat, nd in (
        ("hessians", calib.hessian, 2),
        ("hessian_invs", calib.hessian_inv, 2),
        ("norms", calib.norms, 1),
    ):
        if stat is None:
            continue
        want = [(cols,) * nd, (inp.tasks,) + (cols,) * nd] if cols else []
        if tuple(stat.shape) not in want:
            raise ValueError(
                f"{label}[{name!r}] has shape {tuple(stat.shape)}; expected one of {want} "
                f"for a tensor of shape {shape} (layout {lay!r})"
            )
    return calib


def _per_model_values(inp: _Inputs, name: str, where: tuple) -> dict[str, tuple[float, ...]]:
    """Every per-model parameter the method takes, one checked float per model."""
    out = {}
    for kw, ps in _PER_MODEL.items():
        if kw not in call_args(inp.spec):
            continue
        vals = _checks.per_task(per_model(inp.per_model[kw], name, ps.default, *where), inp.tasks, kw, name)
        if ps.lo is not None or ps.hi is not None:
            _checks.in_range(vals, -np.inf if ps.lo is None else ps.lo, np.inf if ps.hi is None else ps.hi, kw, name)
        out[kw] = vals
    return out


def _check_trim(
    inp: _Inputs,
    name: str,
    shape: tuple[int, ...],
    kind: str | None,
    vals: dict,
    obs: ObsOptions,
    calib: Calibration,
    params: dict,
    cols: int | None,
) -> bool:
    """Checks of the tensor's trim; returns whether its calibration statistics are missing."""
    if kind is None:
        if any(d != 1.0 for d in vals["densities"]):
            raise ValueError(
                f"densities {list(vals['densities'])} < 1 for tensor {name!r} but method "
                f"{inp.spec.name!r} does not trim by itself: pass trim=... (one of {', '.join(TRIMS)})"
            )
        if params.get("rescale") is True:
            raise ValueError(f"rescale=True needs a trim, for tensor {name!r}")
        return False
    if kind not in TRIMS:
        raise ValueError(f"unknown trim {kind!r} for tensor {name!r}; known trims: {', '.join(TRIMS)}")
    if kind in DATA_TRIMS and len(shape) != 2:
        raise ValueError(
            f"trim={kind!r} needs 2-D linear weights, but tensor {name!r} has shape {shape}; "
            "give it a data-free trim with a per-tensor trim spec"
        )
    if kind == "sparsegpt" and obs.prunem and cols is not None and cols % obs.prunem:
        raise ValueError(f"tensor {name!r} has {cols} input columns, not a multiple of prunem {obs.prunem}")
    if kind == "sparsegpt" and obs.refit and calib.hessian is None and calib.hessian_inv is not None:
        raise ValueError(f"refit needs the Hessian itself, not its inverse, for tensor {name!r}")
    if kind == "magprune":
        for i, (d, e) in enumerate(zip(vals["densities"], vals["epsilon"])):
            if 0.0 < d < 1.0 and not (d - e > 0.0 and d + e < 1.0):
                raise ValueError(
                    f"magprune (DELLA) needs 0 < density - epsilon and density + epsilon < 1; "
                    f"model {i} has density {d}, epsilon {e} for tensor {name!r}"
                )
    if kind in DATA_TRIMS:
        if kind == "sparsegpt":
            return calib.hessian is None and calib.hessian_inv is None
        return calib.hessian is None and calib.norms is None
    return False


def _plan_tensor(inp: _Inputs, name: str, shape: tuple[int, ...]) -> tuple[_Planned, str | None, bool]:
    """(the tensor's plan, its trim, whether its statistics are missing); ValueError naming it."""
    spec = inp.spec
    layer = inp.block_of(name) if inp.block_of is not None else None
    where = (layer, inp.num_layers)
    params = {k: resolve(v, name, *where) for k, v in inp.params.items()}
    vals = _per_model_values(inp, name, where)
    lay = resolve(inp.layout, name, *where)
    if lay not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {lay!r} for tensor {name!r}")
    transpose = lay == "flax" and len(shape) == 2
    cols = (shape[0] if transpose else shape[-1]) if len(shape) == 2 else None
    calib = _calibration(inp, name, shape, lay, cols)
    options = {k: resolve(v, name, *where) for k, v in inp.options.items()}
    obs = ObsOptions(**{k: v for k, v in options.items() if k != "trim" and v is not None})
    bad = obs.problems()
    if bad:
        raise ValueError("; ".join(bad))
    trim = options.get("trim")
    kind = trim if trim is not None else spec.default_trim
    missing = spec.trims and _check_trim(inp, name, shape, kind, vals, obs, calib, params, cols)
    tasks = inp.tasks
    plan = TensorPlan(
        method=spec.name,
        name=name,
        weights=vals["weights"],
        densities=vals.get("densities", (1.0,) * tasks),
        trim=trim,
        params=params,
        gamma=vals.get("gamma"),
        epsilon=vals.get("epsilon"),
        obs=obs,
        seed=inp.seed,
    )
    return _Planned(plan, calib, transpose), kind, missing


def _check_arguments(spec: MethodSpec, params: dict[str, Any], options: dict[str, Any], given: dict[str, Any]) -> None:
    """Parameters the method does not take; ValueError naming them and the ones it has."""
    keywords = {ps.name: ps.keyword for ps in spec.params}
    for k in list(params):
        if k in keywords and k != keywords[k]:  # a config name (`lambda`) for the keyword (`lambda_`)
            params[keywords[k]] = params.pop(k)
    allowed = set(keywords.values()) | (set(_TRIM_OPTIONS) if spec.trims else set())
    unknown = sorted((set(params) | set(options)) - allowed)
    if unknown:
        raise ValueError(f"method {spec.name!r} has no parameter(s) {unknown}; its parameters: {sorted(allowed)}")
    for kw, v in given.items():
        if v is not None and kw not in call_args(spec):
            raise ValueError(f"method {spec.name!r} takes no {kw!r}")


# --------------------------------------------------------------------------- merge


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
    trim: Any = None,
    blocksize: Any = None,
    percdamp: Any = None,
    prunen: Any = None,
    prunem: Any = None,
    refit: Any = None,
    block_of: Callable[[str], int | None] | None = None,
    **params: Any,
) -> Any:
    """Merge fine-tuned `models` into `base` with `method` (see `available_methods()`).

    Args:
      method: a name from `sgtv_jax.merge.specs.METHOD_SPECS`.
      base: the base model `theta_0` (pytree of arrays).
      models: the fine-tuned models `theta_t`, same tensor names and shapes.
      weights, densities, gamma, epsilon: per-model parameters (specs, see module
        doc); unset, each model takes the method's default (weight 1, density 1
        (no trimming), gamma 0.01, epsilon 0.15).
      hessians: `name -> H` `[in, in]` (shared) or `[T, in, in]` (per model), the
        calibration statistics for `trim="sparsegpt"` / `"wanda"` and regmean's
        Grams; `hessian_invs`: full inverse Hessians instead (sparsegpt only);
        `norms`: `name -> [in]` / `[T, in]` input norms for wanda.
      layout: spec, "torch" (`[out, in]`, default) or "flax" (`[in, out]`
        kernels; transposed around the method, so row-wise trims and OBS work
        per output feature).
      seed: int or PRNG key; tensor `name` uses `keys.tensor_key(seed, name)`,
        so the result is bit-identical for a seed whatever the visiting order.
      trim: spec, a trim of `trim.TRIMS` replacing the method's own (methods that trim).
      blocksize, percdamp, prunen, prunem, refit: specs, the OBS options of a
        `sparsegpt` trim (`plan.ObsOptions`; unset: its defaults): N:M pruning
        (e.g. `prunen=2, prunem=4`) replaces the densities; `refit=True`
        re-solves the kept entries by least squares (needs `hessians`).
      block_of: `name -> decoder block index` (None outside the blocks); with it
        a spec may be a gradient over the blocks (`paramspec`), the number of
        blocks being one more than the largest index.
      **params: method parameters (specs), e.g. `normalize`, `lambda_` (or
        `"lambda"` via `**{"lambda": 0.5}`), `rescale`, `consensus`, `alpha`.
    Returns:
      The merged model, same pytree structure and dtypes as `base`
      (non-floating tensors are copied from `base`).
    """
    spec = method_spec(method)
    options = {k: v for k, v in zip(_TRIM_OPTIONS, (trim, blocksize, percdamp, prunen, prunem, refit)) if v is not None}
    given = {"weights": weights, "densities": densities, "gamma": gamma, "epsilon": epsilon}
    _check_arguments(spec, params, options, given)
    base_leaves, treedef, names, model_leaves = _checked_leaves(base, models)
    tasks = len(models)
    floats = [n for n in names if jnp.issubdtype(jnp.asarray(base_leaves[n]).dtype, jnp.floating)]
    # ---- plan: resolve and validate every tensor's parameters before merging anything
    problems: list[str] = []
    inp = _Inputs(
        spec,
        tasks,
        _split_per_model_specs(spec, given, tasks, problems),
        params,
        options,
        {"hessians": hessians, "hessian_invs": hessian_invs, "norms": norms},
        layout,
        seed,
        block_of,
        _num_layers(block_of, floats),
    )
    plans = _plan_tensors(inp, floats, base_leaves, problems)
    # ---- merge tensor by tensor
    out = [_merge_tensor(plans.get(name), base_leaves[name], [m[name] for m in model_leaves]) for name in names]
    return jax.tree_util.tree_unflatten(treedef, out)


def _num_layers(block_of: Callable[[str], int | None] | None, floats: list[str]) -> int | None:
    """One more than the largest block index `block_of` gives the floating tensors (None: no blocks)."""
    blocks = [b for b in map(block_of, floats) if b is not None] if block_of is not None else []
    return max(blocks) + 1 if blocks else None


def _checked_leaves(base: Any, models: Sequence[Any]) -> tuple[dict[str, Any], Any, list[str], list[dict[str, Any]]]:
    """`named_leaves(base)` and each model's leaves, after the models' names, shapes and values are checked."""
    if isinstance(models, Mapping) or not isinstance(models, Sequence) or len(models) == 0:
        raise ValueError("models must be a non-empty sequence of fine-tuned models")
    base_leaves, treedef, names = named_leaves(base)
    model_leaves = [named_leaves(m)[0] for m in models]
    _check_models(base_leaves, model_leaves)
    _check_finite(base_leaves, model_leaves, names)
    return base_leaves, treedef, names, model_leaves


def _split_per_model_specs(
    spec: MethodSpec, given: dict[str, Any], tasks: int, problems: list[str]
) -> dict[str, list[Any]]:
    """The method's per-model keywords -> one spec per model; spec errors go to `problems`."""
    per_model_specs = {}
    for kw, v in given.items():
        if kw in call_args(spec):
            try:
                per_model_specs[kw] = split_per_model(v, tasks, kw)
            except SpecError as e:
                problems.append(str(e))
    return per_model_specs


def _plan_tensors(
    inp: _Inputs, floats: list[str], base_leaves: dict[str, Any], problems: list[str]
) -> dict[str, _Planned]:
    """Every floating tensor's plan; ValueError listing all `problems` (and the plans' own) if any."""
    plans: dict[str, _Planned] = {}
    missing: dict[str, str | None] = {}
    kinds = set()
    if not problems:
        for name in floats:
            try:
                plans[name], kind, lacks = _plan_tensor(inp, name, tuple(jnp.shape(base_leaves[name])))
            except ValueError as e:
                problems.append(str(e))
                continue
            kinds.add(kind)
            if lacks:
                missing[name] = kind
    if missing:
        trims = sorted({str(k) for k in missing.values()})
        problems.append(
            f"{len(missing)} tensor(s) have no calibration statistics for trim "
            f"{'/'.join(trims)}: {list(missing)}. "
            + missing_stats_message(trims[0] if len(trims) == 1 else "sparsegpt", None)
            + " (a per-tensor trim spec such as [{'filter': 'kernel', 'value': 'sparsegpt'}, "
            "{'value': 'magnitude'}] trims the others without data)"
        )
    if plans and "sparsegpt" not in kinds and any(p.plan.obs.prunem or p.plan.obs.refit for p in plans.values()):
        problems.append("prunen/prunem (N:M) and refit act on the OBS trim: they need trim='sparsegpt'")
    if problems:
        raise ValueError("invalid merge: " + "; ".join(dict.fromkeys(problems)))
    return plans


def _merge_tensor(planned: _Planned | None, base: Any, tuned: list[Any]) -> Any:
    """`base + merged delta` in base's dtype; `base` itself when the tensor has no plan (not floating)."""
    if planned is None:
        return base
    plan, calib, transpose = planned
    b = jnp.asarray(base)
    dt = _checks.work_dtype(b.dtype)
    deltas = jnp.stack([jnp.asarray(m).astype(dt) for m in tuned]) - b.astype(dt)
    if transpose:
        deltas = jnp.swapaxes(deltas, 1, 2)
    merged, _, _ = merge_planned(plan, deltas, calib, base=b.T if transpose else b)
    if transpose:
        merged = merged.T
    return (b.astype(merged.dtype) + merged).astype(b.dtype)
