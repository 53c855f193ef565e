"""The block-by-block merge pipeline behind `sgtv merge CONFIG OUT`.

    embeddings (merged data-free) -> for each decoder block i:
        read block i of the base and of every fine-tuned model (lazy, one block in memory)
        capture the inputs of every linear layer over all calibration windows
            (q/k/v share one input, gate/up share one: one Hessian per distinct input)
        H = sgtv_jax.hessian over the captured inputs (padding masked)
        trim every model's task vector: stack [T, out, in] with one shared H
            (sgtv_jax.obs.obs_prune for sparsegpt; sgtv_jax.merge.trim otherwise)
        merge with the method of sgtv_jax.merge (sign election after OBS)
        install the merged block, propagate the calibration hidden states:
            merged   -> through the merged block (H of block i+1 = merged-so-far inputs)
            base     -> through the base block
            per_task -> each model's windows through its own fine-tuned block (H per task)
    final norm / untied head (merged data-free) -> atomic export (HF dir or Orbax)

The linear layers of block i in `merged` mode see the *merged-so-far* model:
merged embeddings and merged blocks `< i`, base weights from block i on.
Norms, biases, embeddings and an untied head use the method's own data-free
trim (e.g. magnitude for ties, random for dare). A data-aware `trim`
(sparsegpt / wanda) applies to the linear layers of the blocks.

A linear tensor's result equals `sgtv_jax.merge.merge(method, ...)` for that
tensor with the same Hessian (trim first, then the method without trim), and
the pipeline also reports per layer: kept density per task, the damping OBS
used, the relative reconstruction error of each trimmed task vector
`tr(E H E^T) / tr(D H D^T)` (E = trimmed - D), the merge's error against the
task-arithmetic target `sum_t w_t D_t`, and the time.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgtv_jax.errors import NumericsError, SgtvError
from sgtv_jax.pipeline.config import (ConfigError, MergeConfig, method_kwargs, model_parameters,
                                      resolve_spec)

STAGES = ("load", "calibrate", "prune", "merge", "export")
FORMATS = ("hf", "orbax")
REPORT_FILE = "merge_report.json"
PLOT_FILE = "merge_layer_error.png"


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- numerics glue


@jax.jit
def _rel_errors(deltas: jax.Array, trimmed: jax.Array, merged: jax.Array, weights: jax.Array,
                hessian: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Relative output errors under H: per task `tr(E H E^T)/tr(D H D^T)`, and of the merge.

    deltas, trimmed `[T, rows, cols]`; merged `[rows, cols]`; weights `[T]`;
    hessian `[cols, cols]` or `[T, cols, cols]`. Returns (`[T]`, scalar).
    """
    hp = jax.lax.Precision.HIGHEST
    h = hessian if hessian.ndim == 3 else jnp.broadcast_to(hessian, (deltas.shape[0],) + hessian.shape)

    def quad(a, hh):
        return jnp.sum(jnp.matmul(a, hh, precision=hp) * a)

    e = trimmed - deltas
    num = jax.vmap(quad)(e, h)
    den = jax.vmap(quad)(deltas, h)
    trim_err = num / jnp.maximum(den, 1e-30)
    target = jnp.tensordot(weights, deltas, axes=1)
    hm = jnp.mean(h, axis=0)
    merge_err = quad(merged - target, hm) / jnp.maximum(quad(target, hm), 1e-30)
    return trim_err, merge_err


def _method_info(method: str) -> tuple[Callable, dict[str, Any]]:
    from sgtv_jax.merge.registry import get_method

    fn = get_method(method)
    defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()}
    return fn, defaults


def merge_tensor(
    method: str,
    deltas: jax.Array,
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    trim: str | None,
    hessian: jax.Array | None,
    params: dict[str, Any],
    seed: int,
    name: str,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    prunen: int = 0,
    prunem: int = 0,
    refit: bool = False,
) -> tuple[jax.Array, jax.Array, float | None]:
    """Trim then merge one tensor's task vectors `deltas` `[T, ...]` (2-D ones PyTorch layout).

    `trim` None means the method's own default trim. Returns (merged task vector
    `[...]`, trimmed stack `[T, ...]`, damping used by OBS or None). Same result
    as `sgtv_jax.merge.merge` for this tensor; the split exposes the trimmed
    vectors for the report.
    """
    from sgtv_jax.merge import trim as trim_lib
    from sgtv_jax.merge.methods import resolve_rescale
    from sgtv_jax.merge.keys import tensor_key
    from sgtv_jax.obs import obs_prune

    fn, defaults = _method_info(method)
    accepted = set(defaults)
    kw = dict(params)
    user_rescale = kw.pop("rescale", None)
    key = tensor_key(seed, name)
    if "trim" not in accepted:  # linear, regmean: no trimming step
        if "grams" in accepted and hessian is not None and deltas.ndim == 3:
            kw["grams"] = hessian
        if "base" in accepted and kw.get("normalize", defaults.get("normalize")) is False:
            raise ConfigError(f"{method} with normalize=false needs whole models; not supported by the pipeline")
        if "densities" in accepted:
            kw["densities"] = list(densities)
        merged = fn(deltas, list(weights), name=name, **kw)
        return merged, deltas, None
    kind = trim if trim is not None else defaults.get("trim")
    # The method's own rule: random default trims rescale by 1/density, calibration trims don't.
    rescale = resolve_rescale(user_rescale, defaults.get("trim") in trim_lib.RANDOM_TRIMS, kind)
    damping = None
    if kind is None:
        if any(d != 1.0 for d in densities):
            raise ConfigError(f"density {list(densities)} < 1 for tensor {name!r} but method {method!r} does not "
                              "trim by itself: set trim (e.g. magnitude or sparsegpt)")
        trimmed = deltas
    elif kind == "sparsegpt":
        nm = dict(prunen=prunen, prunem=prunem) if prunem else dict(density=list(densities))
        trimmed, info = obs_prune(deltas, hessian, blocksize=blocksize, percdamp=percdamp, refit=refit,
                                  name=name, return_info=True, **nm)
        damping = float(jnp.max(info.percdamp))
        if rescale:
            trimmed = trim_lib.inverse_density_scale(trimmed, densities)
    else:
        extra = {}
        if gamma is not None:
            extra["gamma"] = list(gamma)
        if epsilon is not None:
            extra["epsilon"] = list(epsilon)
        calib = trim_lib.Calibration(hessian=hessian) if hessian is not None else None
        trimmed = trim_lib.trim(kind, deltas, list(densities), key=key, calib=calib, rescale=rescale,
                                blocksize=blocksize, percdamp=percdamp, name=name, **extra)
    if "key" in accepted:
        kw["key"] = key
    merged = fn(trimmed, list(weights), 1.0, trim=None, rescale=False, name=name, **kw)
    return merged, trimmed, damping


# --------------------------------------------------------------------------- model plumbing


@dataclasses.dataclass
class _Arch:
    """Everything architecture-specific, from the base config."""

    model_type: str
    hf_config: dict[str, Any]
    hf_obj: Any
    name_map: Any
    family: Any
    num_layers: int
    graphdef: Any
    template: Any  # FlatState of block 0 (abstract)

    def prefix(self, i: int) -> str:
        return self.family.hf_block_prefix(i)

    def abstract_model(self) -> Any:
        from sgtv_jax.models import build_abstract_model

        return build_abstract_model(self.hf_obj)

    def block_state(self, i: int, tensors: dict[str, np.ndarray]) -> Any:
        """`nnx.State` of block i from its HF-named tensors (float32)."""
        from flax import nnx

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


def _arch(base_ckpt: Any) -> _Arch:
    from flax import nnx

    from convert.architectures import get_architecture
    from convert.readers import hf_config_object
    from sgtv_jax.models import build_abstract_model, split_block

    cfg = dict(base_ckpt.config)
    mt = cfg["model_type"]
    row = get_architecture(mt)
    obj = hf_config_object(cfg)
    model = build_abstract_model(obj)
    graphdef, state = split_block(model, 0)
    return _Arch(mt, cfg, obj, row.name_map, row.family, len(model.blocks), graphdef,
                 list(nnx.to_flat_state(state)))


def _input_groups(arch: _Arch, state: Any, x: jax.Array, kw: dict[str, Any]) -> list[tuple[str, ...]]:
    """Linear layers of a block that share one input tensor (e.g. q/k/v), by tracing once."""
    from flax import nnx

    out: dict[str, Any] = {}

    def f(state, x):
        block = nnx.merge(arch.graphdef, state)
        _, caps = block(x, capture=True, **kw)
        by_id: dict[int, list[str]] = {}
        for n, v in caps.items():
            by_id.setdefault(id(v), []).append(n)
        out["groups"] = [tuple(g) for g in by_id.values()]
        return 0

    jax.eval_shape(f, state, x)
    return out["groups"]


@dataclasses.dataclass
class _Stream:
    """Calibration hidden states in micro-batches: h `[b, S, D]`, mask `[b, S]`, block kwargs."""

    hidden: list[jax.Array]
    masks: list[jax.Array]
    kwargs: list[dict[str, Any]]


def _embed_stream(arch: _Arch, outer: dict[str, np.ndarray], calib: Any, batch_size: int) -> _Stream:
    model = arch.outer_model(outer)
    hs, ms, kws = [], [], []
    n = calib.input_ids.shape[0]
    for s in range(0, n, batch_size):
        ids = jnp.asarray(calib.input_ids[s:s + batch_size])
        mask = jnp.asarray(calib.mask[s:s + batch_size])
        hs.append(model.embed(ids))
        ms.append(mask)
        kws.append(model.block_kwargs(mask, ids.shape[1], batch=ids.shape[0]))
    return _Stream(hs, ms, kws)


def _capture(arch: _Arch, state: Any, stream: _Stream, groups: list[tuple[str, ...]]
             ) -> tuple[dict[str, jax.Array], list[jax.Array]]:
    """Run one block over a stream: Hessian per input group (keyed by each member), outputs."""
    from sgtv_jax.hessian import hessian_finalize, hessian_init, hessian_update
    from sgtv_jax.models import apply_block

    acc: dict[str, Any] = {}
    outs = []
    for h, m, kw in zip(stream.hidden, stream.masks, stream.kwargs):
        y, caps = apply_block(arch.graphdef, state, h, capture=True, **kw)
        for g in groups:
            x = caps[g[0]]
            if g[0] not in acc:
                acc[g[0]] = hessian_init(x.shape[-1])
            acc[g[0]] = hessian_update(acc[g[0]], x, m)
        outs.append(y)
    hess = {}
    for g in groups:
        hmat = hessian_finalize(acc[g[0]])
        for n in g:
            hess[n] = hmat
    return hess, outs


def _propagate(arch: _Arch, state: Any, stream: _Stream) -> list[jax.Array]:
    from sgtv_jax.models import apply_block

    return [apply_block(arch.graphdef, state, h, capture=False, **kw)
            for h, kw in zip(stream.hidden, stream.kwargs)]


# --------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass
class LayerRecord:
    """One report row (a tensor). Lists are per fine-tuned model."""

    name: str
    block: int | None
    linear: bool
    shape: tuple[int, ...]
    trim: str | None
    density: list[float]
    kept_density: list[float]
    damping: float | None
    trim_error: list[float] | None
    merge_error: float | None
    time_s: float


class _Timer:
    def __init__(self) -> None:
        self.stages = {s: 0.0 for s in STAGES}

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.stages[stage] += now - t0
        return now


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _round_to(arr: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    return np.asarray(arr).astype(out_dtype)


class MergeRun:
    """One merge (see module doc). Use `run_merge`; attributes hold the report after `tensors()`.

    Args:
      cfg: a validated `MergeConfig`.
      hessian_sink: optional dict filled with `{hf_tensor_name: H}` (numpy,
        `[in, in]` or `[T, in, in]`) for every linear layer, for tests/analysis.
      progress: show a tqdm bar per block.
    """

    def __init__(self, cfg: MergeConfig, *, hessian_sink: dict[str, np.ndarray] | None = None,
                 progress: bool = True) -> None:
        from convert.conversion import source_dtype
        from convert.dtypes import parse_dtype
        from convert.readers import open_checkpoint

        self.cfg = cfg
        self.sink = hessian_sink
        self.progress = progress
        self.timer = _Timer()
        t0 = time.perf_counter()
        self.base = open_checkpoint(cfg.base_model)
        self.models = [open_checkpoint(m.model) for m in cfg.models]
        self.arch = _arch(self.base)
        self.out_dtype_name = cfg.dtype or source_dtype(self.base)
        self.out_dtype = parse_dtype(self.out_dtype_name)
        self.records: list[LayerRecord] = []
        self.timer.add("load", t0)
        self.T = len(self.models)
        self.use_data = any(cfg.calibration_for(t) is not None for t in range(self.T))
        self.calib_tokens = 0

    # -- parameters per tensor
    def _per_model(self, key: str, name: str, layer: int | None, default: float | None) -> list[float] | None:
        vals = []
        for t in range(self.T):
            spec = model_parameters(self.cfg, t).get(key)
            if spec is None:
                if default is None:
                    return None
                vals.append(default)
            else:
                vals.append(float(resolve_spec(spec, name, layer, self.arch.num_layers)))
        return vals

    def _trim_for(self, name: str, layer: int | None, linear: bool) -> str | None:
        from sgtv_jax.merge.trim import DATA_TRIMS

        if self.cfg.trim is None:
            return None
        kind = resolve_spec(self.cfg.trim, name, layer, self.arch.num_layers)
        if kind in DATA_TRIMS and not linear:
            return None  # data-free tensors: the method's own trim
        return kind

    def _merge_one(self, name: str, layer: int | None, base: np.ndarray,
                   fts: Sequence[np.ndarray] | Callable[[int], np.ndarray],
                   hessian: jax.Array | None, torch_layout: bool) -> np.ndarray:
        """Merge one tensor; returns the merged tensor in the output dtype (HF layout).

        `fts`: model t's tensor, as a list or a reader `t -> array` (then only
        one raw tensor is alive at a time: the peak memory is an embedding's).
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        b = _f32(base)
        d = np.empty((self.T,) + b.shape, np.float32)  # one [T, ...] buffer
        for t in range(self.T):
            np.subtract(_f32(fts(t) if callable(fts) else fts[t]), b, out=d[t])
        deltas = jax.device_put(d)  # zero-copy on CPU (jnp.asarray makes two copies here)
        del d
        transpose = base.ndim == 2 and not torch_layout
        if transpose:
            deltas = jnp.swapaxes(deltas, 1, 2)
        densities = self._per_model("density", name, layer, 1.0)
        weights = self._per_model("weight", name, layer, 1.0)
        trim = self._trim_for(name, layer, hessian is not None)
        tp = time.perf_counter()
        if not any(np.any(deltas[t] != 0) for t in range(self.T)):
            # No model changed this tensor: every trim and method maps zero task vectors
            # to a zero merge, so the base tensor is the result (no OBS / sort work).
            self.timer.add("prune", tp)
            self.records.append(LayerRecord(
                name=name, block=layer, linear=hessian is not None, shape=tuple(base.shape), trim="unchanged",
                density=densities, kept_density=[0.0] * self.T, damping=None, trim_error=None,
                merge_error=None, time_s=time.perf_counter() - t0))
            return _round_to(b, self.out_dtype)
        try:
            merged, trimmed, damping = merge_tensor(
                cfg.merge_method, deltas, weights=weights, densities=densities, trim=trim, hessian=hessian,
                params=method_kwargs(cfg, name, layer, self.arch.num_layers), seed=cfg.seed, name=name,
                gamma=self._per_model("gamma", name, layer, None),
                epsilon=self._per_model("epsilon", name, layer, None),
                blocksize=cfg.blocksize, percdamp=cfg.percdamp, prunen=cfg.prunen, prunem=cfg.prunem,
                refit=cfg.refit,
            )
        except SgtvError:
            raise
        except ValueError as e:
            # The merge library's checks (an indefinite Hessian after damping, magprune's
            # density/epsilon bounds, ...) fail on this tensor's data: say which tensor.
            raise NumericsError(f"merging tensor {name!r} ({cfg.merge_method}, trim {trim or 'default'}): {e}") from e
        merged = jax.block_until_ready(merged)
        self.timer.add("prune", tp)
        tm = time.perf_counter()
        kept = [float(jnp.mean(trimmed[t] != 0)) for t in range(self.T)]
        trim_err = merge_err = None
        if hessian is not None and deltas.ndim == 3:
            te, me = _rel_errors(deltas, trimmed.astype(jnp.float32), merged.astype(jnp.float32),
                                 jnp.asarray(weights, jnp.float32), hessian)
            trim_err, merge_err = [float(x) for x in te], float(me)
        if transpose:
            merged = merged.T
        out = _round_to(np.asarray(b + np.asarray(merged, np.float32)), self.out_dtype)
        self.timer.add("merge", tm)
        self.records.append(LayerRecord(
            name=name, block=layer, linear=hessian is not None, shape=tuple(base.shape),
            trim=trim or _method_info(cfg.merge_method)[1].get("trim"), density=densities, kept_density=kept, damping=damping, trim_error=trim_err,
            merge_error=merge_err, time_s=time.perf_counter() - t0))
        return out

    def _label(self, ckpt: Any) -> str:
        """The checkpoint as the YAML names it, e.g. `models[1] (ft/math)`."""
        if ckpt is self.base:
            return f"base_model ({self.cfg.base_model_written or self.cfg.base_model})"
        t = next(i for i, m in enumerate(self.models) if m is ckpt)
        return f"models[{t}] ({self.cfg.models[t].label})"

    def _get(self, ckpt: Any, name: str) -> np.ndarray:
        """Tensor `name` of `ckpt`; `NumericsError` naming tensor and model if it holds NaN/Inf."""
        a = ckpt.get(name)
        if a.dtype.kind not in "biu":  # float16/32/64 and ml_dtypes' bfloat16 (kind "V")
            bad = int(np.count_nonzero(~np.isfinite(a)))
            if bad:
                raise NumericsError(f"tensor {name!r} of {self._label(ckpt)} has {bad} NaN or Inf entries "
                                    "(a broken checkpoint: fix or replace this model)")
        return a

    def _read_one(self, ckpt: Any, name: str) -> np.ndarray:
        t0 = time.perf_counter()
        a = self._get(ckpt, name)
        self.timer.add("load", t0)
        return a

    def _read(self, names: list[str]) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        t0 = time.perf_counter()
        base = {n: self._get(self.base, n) for n in names}
        fts = [{n: self._get(m, n) for n in names} for m in self.models]
        self.timer.add("load", t0)
        return base, fts

    def _calibration_sets(self) -> list[Any]:
        from sgtv_jax.pipeline.calibration import load_calibration, load_tokenizer
        from sgtv_jax.pipeline.check import max_positions_of

        tok = load_tokenizer(self.cfg.base_model)
        maxpos = max_positions_of(self.arch.hf_config)
        if self.cfg.hessian_source == "per_task":
            sets = [load_calibration(self.cfg.calibration_for(t), tok, maxpos) for t in range(self.T)]
        else:
            shared = self.cfg.calibration or self.cfg.calibration_for(0)
            sets = [load_calibration(shared, tok, maxpos)]
        self.calib_tokens = sum(s.tokens for s in sets)
        return sets

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """The merged model, HF name by HF name, block by block (lazy: drives the whole merge)."""
        arch, cfg = self.arch, self.cfg
        names = list(self.base.names())
        L = arch.num_layers
        prefixes = [arch.prefix(i) for i in range(L)]
        rules = {}
        for n in names:
            rules[n] = arch.name_map.rule_for_hf(n, arch.hf_obj)
        block_names = [[n for n in names if n.startswith(p) and rules[n] is not None] for p in prefixes]
        in_blocks = {n for bn in block_names for n in bn}
        outer = [n for n in names if n not in in_blocks and rules[n] is not None]

        # ---- outer tensors (embeddings, final norm, head): data-free merge
        merged_o = {}
        for n in outer:  # one raw tensor in memory at a time
            base_n = self._read_one(self.base, n)
            merged_o[n] = self._merge_one(n, None, base_n, lambda t, n=n: self._read_one(self.models[t], n), None,
                                          rules[n].transpose)
            del base_n
        for n in outer:
            yield n, merged_o[n]

        streams: list[_Stream] = []
        groups = None
        if self.use_data:
            tc = time.perf_counter()
            sets = self._calibration_sets()
            mode = cfg.hessian_source
            if mode == "merged":
                src = [{n: _f32(merged_o[n]) for n in outer}]
            elif mode == "base":
                src = [self._read(outer)[0]]
            else:
                src = self._read(outer)[1]
            streams = [_embed_stream(arch, s, c, cfg.batch_size) for s, c in zip(src, sets)]
            del src
            self.timer.add("calibrate", tc)
        del merged_o

        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=L, desc="merge", unit="block")
        try:
            for i in range(L):
                bnames = block_names[i]
                base_b, fts_b = self._read(bnames)
                hess: dict[str, jax.Array] = {}
                if streams:
                    tc = time.perf_counter()
                    mode = cfg.hessian_source
                    if mode == "per_task":
                        states = [arch.block_state(i, f) for f in fts_b]
                    else:
                        states = [arch.block_state(i, base_b)]
                    if groups is None:
                        s0 = streams[0]
                        groups = _input_groups(arch, states[0], s0.hidden[0], s0.kwargs[0])
                    per = []
                    for t, (st, stream) in enumerate(zip(states, streams)):
                        h, outs = _capture(arch, st, stream, groups)
                        per.append(h)
                        if mode != "merged":
                            stream.hidden = outs  # base / per_task: the source block's outputs
                    for ln in per[0]:
                        hess[ln] = per[0][ln] if mode != "per_task" else jnp.stack([p[ln] for p in per])
                    jax.block_until_ready(list(hess.values()))
                    self.timer.add("calibrate", tc)
                merged_b = {}
                for n in bnames:
                    local = n[len(prefixes[i]):]
                    lname = local[:-len(".weight")] if local.endswith(".weight") else None
                    h = hess.get(lname) if lname is not None and base_b[n].ndim == 2 else None
                    if h is not None and self.sink is not None:
                        self.sink[n] = np.asarray(h)
                    merged_b[n] = self._merge_one(n, i, base_b[n], [f[n] for f in fts_b], h, rules[n].transpose)
                if streams and cfg.hessian_source == "merged":
                    tc = time.perf_counter()
                    st = arch.block_state(i, {n: _f32(a) for n, a in merged_b.items()})
                    streams[0].hidden = _propagate(arch, st, streams[0])
                    jax.block_until_ready(streams[0].hidden)
                    self.timer.add("calibrate", tc)
                del base_b, fts_b
                for n in bnames:
                    yield n, merged_b[n]
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def report(self, wall_s: float) -> dict[str, Any]:
        """The JSON report: config, stage times, peak RSS, one row per tensor."""
        stages = dict(self.timer.stages)
        stages["export"] = max(0.0, wall_s - sum(v for k, v in stages.items() if k != "export"))
        return {
            "config": _jsonable(self.cfg.to_dict()),
            "model_type": self.arch.model_type,
            "num_layers": self.arch.num_layers,
            "hessian_source": self.cfg.hessian_source,
            "calibration_tokens": self.calib_tokens,
            "output_dtype": self.out_dtype_name,
            "wall_s": wall_s,
            "stages_s": stages,
            "peak_rss_mb": peak_rss_mb(),
            "layers": [_jsonable(dataclasses.asdict(r)) for r in self.records],
        }

    def close(self) -> None:
        for c in [self.base] + self.models:
            c.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """PNG of the per-layer relative reconstruction error (trim error per task, merge error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["layers"] if r["trim_error"] is not None]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.08), 4))
    if rows:
        x = np.arange(len(rows))
        te = np.asarray([r["trim_error"] for r in rows])
        for t in range(te.shape[1]):
            ax.plot(x, te[:, t], ".-", lw=0.8, label=f"trim error, model {t}")
        ax.plot(x, [r["merge_error"] for r in rows], "k.-", lw=0.8, label="merge error vs sum w_t D_t")
        ax.set_yscale("log")
        ax.set_xlabel("linear layer (in block order)")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no calibration data: no reconstruction errors", ha="center", va="center")
    ax.set_ylabel("relative reconstruction error")
    ax.set_title(f"{report['config']['merge_method']} ({report['hessian_source']} Hessians)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def merge_inputs(cfg: MergeConfig) -> dict[str, str]:
    """Every path a merge reads, labelled by its config key: the output may overlap none of them."""
    inputs = {"base_model": cfg.base_model}
    for t, m in enumerate(cfg.models):
        inputs[f"models[{t}].model"] = m.model
        for k, f in enumerate(m.calibration.data if m.calibration is not None else ()):
            inputs[f"models[{t}].calibration.data[{k}]"] = f
    for k, f in enumerate(cfg.calibration.data if cfg.calibration is not None else ()):
        inputs[f"calibration.data[{k}]"] = f
    return inputs


def run_merge(
    cfg: MergeConfig,
    out: str | Path,
    *,
    format: str = "hf",
    overwrite: bool = False,
    progress: bool = True,
    hessian_sink: dict[str, np.ndarray] | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Merge as configured and write the result atomically to `out`; returns the report.

    Checks everything first, before any weights load: the output path
    (`convert.atomic.prepare_output`: `out` may not be, contain or lie inside
    any model or calibration file; an existing `out` is replaced only with
    `overwrite` and only if it is a previous output of this tool or empty) and
    the config (`sgtv_jax.pipeline.check.check_config`). `format`: "hf"
    (safetensors directory via `convert.export_hf`, with model card,
    `merge_report.json` and the error plot) or "orbax". A merge that fails or
    is killed leaves at most a hidden `.OUT.partial-*` directory (removed by
    the next run into `out`), never a complete-looking `out`.
    """
    from convert.atomic import prepare_output
    from convert.export import export_hf

    from sgtv_jax.pipeline.check import check_config

    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; one of {', '.join(FORMATS)}")
    out = Path(out)
    inputs = merge_inputs(cfg)
    prepare_output(out, overwrite=overwrite, inputs=inputs)
    if check:
        check_config(cfg)
    t0 = time.perf_counter()
    run = MergeRun(cfg, hessian_sink=hessian_sink, progress=progress)
    box: dict[str, Any] = {}

    def finalize(tmp: Path) -> None:
        box["report"] = rep = run.report(time.perf_counter() - t0)
        (tmp / REPORT_FILE).write_text(json.dumps(rep, indent=1) + "\n")
        plot_report(rep, tmp / PLOT_FILE)

    card = {"method": f"{cfg.merge_method}" + (f" + {cfg.trim}" if cfg.trim else ""),
            "parameters": _jsonable(cfg.to_dict())}
    try:
        if format == "hf":
            export_hf(run.tensors(), out, base=run.base, dtype=run.out_dtype_name,
                      max_shard_size=cfg.max_shard_size, model_card=card, overwrite=overwrite,
                      finalize=finalize, inputs=inputs)
        else:
            _export_orbax(run, out, overwrite, finalize, inputs)
    finally:
        run.close()
    rep = box["report"]
    rep["wall_s"] = time.perf_counter() - t0
    rep["stages_s"]["export"] = max(0.0, rep["wall_s"] - sum(v for k, v in rep["stages_s"].items() if k != "export"))
    rep["peak_rss_mb"] = peak_rss_mb()
    try:  # final figures (export included); the directory is complete either way
        (out / REPORT_FILE).write_text(json.dumps(rep, indent=1) + "\n")
    except OSError:
        pass
    return rep


def _export_orbax(run: MergeRun, out: Path, overwrite: bool, finalize: Callable[[Path], None],
                  inputs: dict[str, str]) -> None:
    from convert.atomic import atomic_output
    from convert.orbax_io import write_orbax

    from sgtv_jax.models import build_abstract_model

    merged = dict(run.tensors())
    # parameters in the output dtype (the config's `dtype`), as the HF export writes them
    model = build_abstract_model(run.arch.hf_obj, param_dtype=jnp.dtype(run.out_dtype))
    run.arch.name_map.load_hf_state_dict_into_model(model, merged, strict=True)
    del merged
    with atomic_output(out, kind="orbax", overwrite=overwrite, inputs=inputs) as tmp:
        write_orbax(model, tmp, hf_config=run.arch.hf_config)
        finalize(tmp)
