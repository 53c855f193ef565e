"""Task-vector merge methods with mergekit's names, parameters and defaults.

All methods here are pure functions of one tensor's stack of task vectors
`deltas` `[T, ...]` (`tau_t = theta_t - theta_0`) and return the merged task
vector `[...]` (float32, or float64 for float64 input); the merged tensor is
`theta_0 + result`. `sgtv_jax.merge.model.merge` maps them over whole models.

The generalized task arithmetic pipeline (mergekit's GTA) every method below is
an instance of:

1. trim each `tau_t` to `densities[t]` (`sgtv_jax.merge.trim`);
2. optionally elect a sign on the weighted trimmed vectors `w_t tau'_t`
   (`sgtv_jax.merge.elect`; after OBS compensation when `trim="sparsegpt"`);
3. combine: `sum_t m_t w_t tau'_t`, divided by `sum_t m_t w_t` when `normalize`
   (`sgtv_jax.merge.combine`), then scaled by `lambda_`.

Common arguments: `weights` `[T]` (required); `densities` `[T]` or one float in
[0, 1]; `trim` replaces the method's own trimming by any of
`trim.TRIMS` ("sparsegpt" / "wanda" need `calib`); `rescale=None` means the
method's default, except that it is off whenever `trim` is "sparsegpt" or
"wanda" (OBS already compensates kept entries; rescaling double-counts);
`key` is this tensor's PRNG key (`keys.tensor_key`) for random trims; `gamma`,
`epsilon` may be per task; `blocksize`, `percdamp` go to the OBS core; `name`
labels errors. mergekit's named methods (`task_arithmetic`, `ties`,
`dare_linear`, `dare_ties`, `della`, `della_linear`, `breadcrumbs`,
`breadcrumbs_ties`, ...) are rows of `specs.METHOD_SPECS` over
`generalized_task_arithmetic`: `variant` makes each one's function, with
the row's trim, sign election, normalize and rescale defaults (as optax's
`nadam = partial(adam, nesterov=True)`); its signature shows them.
TIES with `trim="sparsegpt"` elects signs on the OBS-compensated vectors;
OBS makes each sparse `tau'_t` carry its task's whole output `tau_t X`, and
the disjoint mean does not divide entries only one task kept, so at low
density such a merge behaves like a *sum* of the compensated vectors: tune
`lambda_` accordingly. DARE keeps each entry with probability `density_t`
(`fold_in(key, t)`); DELLA's MagPrune keeps entries of a row ranked by `|tau|`
with probability `density - epsilon + 2 epsilon rank/(n-1)`; breadcrumbs keeps
the entries ranked `[gamma n, gamma n + density n)` by `|tau|` (descending).

Inside JAX transforms: `weights`, `densities`, `lambda_`, `gamma`, `epsilon`
and `percdamp` may be traced arrays (`jit`, `vmap` over settings, `grad`);
`trim`, `consensus`, `normalize`, `rescale`, `refit`, `blocksize` are Python
values that select the program. The merged tensor is differentiable in
`weights` and `lambda_`; which entries are kept (the trim) and which agree with
the elected sign are constants for `grad` (the election reads
`stop_gradient` of the weighted vectors), so a gradient says how the merge
moves with the coefficients for the current masks. Value checks on traced
arguments become checkify user checks and NaN results (`sgtv_jax._checks.Guard`).

mergekit's TIES, per tensor in the dtype it loaded the models in: `tau_t =
theta_t - theta_0`; keep the first `int(density_t * n)` entries of an
(unstable) descending sort of `|tau_t|`; `x_t = w_t tau'_t`; elect `+1` where
`sum_t x_t >= 0`, else `-1`; `m_t = [sign(x_t) == elected]` (zeros never agree);
`sum_t m_t x_t / sum_t m_t w_t` (a zero divisor -> 1), times lambda. Ours is the
same computation (in float32, or float64 for float64 input) except for:

* the count: `round(density * n)` by default. mergekit's `int()` truncates, so a
  float error just below an integer loses an entry (`int(0.29 * 100) == 28`)
  and `density * n = k + 1/2` keeps `k`. We keep `round` because a density then
  means the nearest count; `count="floor"` gives mergekit's count exactly (also
  for traced densities). Nothing else changes with it.
* entries tied in `|tau|` at the cut: we keep the earlier ones (a stable sort).
  mergekit's torch `argsort` is unstable, so which of the tied entries it keeps
  is unspecified (it differs between sort implementations, CPU and GPU); task
  vectors of fine-tunes trained in bf16 and saved in float32 have thousands of
  entries tied at a typical threshold. No rule reproduces that order, so exact
  parity holds where the cut falls between distinct magnitudes.
* DARE / DELLA `rescale` divides by the keep probability (mergekit matches the
  L1 norm of the untrimmed vector); density 0 (or a count of 0) gives zeros
  instead of an assertion; `lambda_` exists for every method.

mergekit also runs the whole computation in the config's `dtype` (e.g. sums in
bfloat16) and casts fine-tunes to the base's dtype before subtracting; we
compute task vectors and merges in float32 and round once at the end.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.merge import combine, elect
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.trim import Calibration

Floats = float | Sequence[float]


class TrimOptions(NamedTuple):
    """The trim options a method passes on unchanged to `trim_lib.trim` (its keywords of these names)."""

    key: jax.Array | None
    calib: Calibration | None
    gamma: Floats | jax.Array  # traced inside a caller's jit / vmap
    epsilon: Floats | jax.Array
    blocksize: int
    percdamp: float
    refit: bool

    def trim(
        self, kind: str, deltas: jax.Array, densities: Any, *, rescale: bool, count: str, name: str | None
    ) -> jax.Array:
        """`trim_lib.trim(kind, deltas, densities, ...)` with these options: `[T, ...]` -> `[T, ...]`."""
        return trim_lib.trim(kind, deltas, densities, rescale=rescale, count=count, name=name, **self._asdict())


def generalized_task_arithmetic(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    trim: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = trim_lib.GAMMA,
    epsilon: Floats = trim_lib.EPSILON,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """Trim -> (elect) -> combine -> scale, the pipeline all task-vector methods share.

    Returns `lambda_ * sum_t m_t w_t trim(tau_t)` (`/ sum_t m_t w_t` when
    `normalize`), `m_t` the sign-agreement mask (ones when `consensus` is None).
    """
    guard = _checks.Guard()
    deltas = _checks.stack(deltas, name, guard=guard)
    tasks = deltas.shape[0]
    w = _checks.per_task_values(weights, tasks, "weights", name, guard)
    dens = _checks.densities_values(densities, tasks, name, guard)
    if consensus is not None and consensus not in elect.CONSENSUS:
        raise ValueError(f"unknown consensus {consensus!r}; known: {', '.join(elect.CONSENSUS)} or None")
    dt = _checks.work_dtype(deltas.dtype)
    x = deltas.astype(dt)
    if trim is not None:
        opts = TrimOptions(key, calib, gamma, epsilon, blocksize, percdamp, refit)
        x = opts.trim(trim, x, dens, rescale=rescale, count=count, name=name)
    else:
        if count != "round":
            raise ValueError(
                f"count={count!r} sets how a trim counts entries, but no trim is given{_checks.where(name)}; "
                "pass trim=... (or leave count at 'round')"
            )
        if isinstance(dens, tuple) and any(d != 1.0 for d in dens):
            raise ValueError(
                f"densities {list(dens)} given but this method does not trim; pass trim=... "
                f"(one of {', '.join(trim_lib.TRIMS)})"
            )
        if not isinstance(dens, tuple):
            guard.require(dens == 1.0, "densities given but this method does not trim; pass trim=...")
        if rescale:
            raise ValueError("rescale=True needs a trim")
    wa = jnp.asarray(w, dt)
    if consensus is None:
        mixed = combine.weighted_sum(x, wa, normalize=normalize)
    else:
        # masks are constants for grad: the election sees stop_gradient of w_t tau_t
        weighted = jax.lax.stop_gradient(x * combine.broadcast_weights(wa, x.ndim))
        mask = elect.agreement_mask(weighted, elect.elect_sign(weighted, consensus))
        mixed = combine.disjoint_merge(x, wa, mask, normalize=normalize)
    return guard.apply(combine.scale(mixed, lambda_))


def resolve_rescale(rescale: bool | None, default: bool, trim: str | None) -> bool:
    """The user's `rescale`, else the method's default, which is off for calibration trims."""
    if rescale is not None:
        return bool(rescale)
    return default and trim not in trim_lib.DATA_TRIMS


def linear(
    deltas: jax.Array,
    weights: Floats,
    *,
    normalize: bool = True,
    base: jax.Array | None = None,
    name: str | None = None,
) -> jax.Array:
    """Linear (model soup): `theta = sum_t w_t theta_t / sum_t w_t`.

    In task-vector form `theta_0 + sum_t w_t tau_t / sum_t w_t` (normalize, the
    default). With `normalize=False` the models are summed, `sum_t w_t theta_t`,
    which needs `base` (`theta_0`): the result is `(sum_t w_t - 1) theta_0 +
    sum_t w_t tau_t`. mergekit's linear also averages the base model when it is
    listed among the models; here only the fine-tuned models take part. A zero
    weight sum with `normalize` is an error (mergekit would divide by zero).
    """
    guard = _checks.Guard()
    deltas = _checks.stack(deltas, name, guard=guard)
    w = _checks.per_task_values(weights, deltas.shape[0], "weights", name, guard)
    dt = _checks.work_dtype(deltas.dtype)
    mixed = combine.weighted_sum(deltas.astype(dt), jnp.asarray(w, dt), normalize=False)
    # known weights: summed in Python (float64) as always; traced: in the program
    total = sum(w) if isinstance(w, tuple) else jnp.sum(w)
    if normalize:
        guard.require(
            jnp.abs(total) >= 1e-12,
            lambda: f"linear with normalize=True needs weights that do not sum to 0, got {list(w)}",
            "linear with normalize=True needs weights that do not sum to 0",
        )
        return guard.apply(mixed / total)
    if base is None:
        raise ValueError("linear with normalize=False sums whole models and needs base=theta_0")
    return guard.apply(mixed + (total - 1.0) * jnp.asarray(base, dt))


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def variant(
    name: str, *, trim: str | None, consensus: str | None, normalize: bool, rescale: bool, doc: str
) -> Callable[..., jax.Array]:
    """`generalized_task_arithmetic` with a method's defaults: the function of a mergekit-named row.

    Its signature is the generic one with `trim`, `consensus` (left out when
    the method elects no sign), `normalize` and `rescale=None` (then the
    method's `rescale`, off for calibration trims: `resolve_rescale`) as given.
    """
    base = inspect.signature(generalized_task_arithmetic)
    preset = {"trim": trim, "consensus": consensus, "normalize": normalize, "rescale": None}
    params = [
        p.replace(default=preset[p.name], annotation="bool | None" if p.name == "rescale" else p.annotation)
        if p.name in preset
        else p
        for p in base.parameters.values()
        if not (p.name == "consensus" and consensus is None)
    ]
    sig = base.replace(parameters=params)

    @functools.wraps(generalized_task_arithmetic)
    def method(*args: Any, **kwargs: Any) -> jax.Array:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        kw = bound.arguments
        kw["rescale"] = resolve_rescale(kw["rescale"], rescale, kw["trim"])
        return generalized_task_arithmetic(**kw)

    method.__signature__ = sig  # type: ignore[attr-defined]
    method.__name__ = method.__qualname__ = name
    method.__doc__ = (
        f"{doc[0].upper()}{doc[1:]}: `generalized_task_arithmetic` with trim {trim!r}, "
        f"sign election {consensus!r}, normalize {_on_off(normalize)}, rescale {_on_off(rescale)} "
        "(off for calibration trims)."
    )
    del method.__wrapped__  # inspect and help() show this signature, not the generic one
    return method
