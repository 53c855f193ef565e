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
labels errors.

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

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.merge import _validate, combine, elect
from sgtv_jax.merge import trim as trim_lib
from sgtv_jax.merge.trim import Calibration

Floats = float | Sequence[float]


def _where(name: str | None) -> str:
    return f" for tensor {name!r}" if name else ""


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
    gamma: Floats = 0.01,
    epsilon: Floats = 0.15,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """Trim -> (elect) -> combine -> scale, the pipeline all task-vector methods share.

    Returns `lambda_ * sum_t m_t w_t trim(tau_t)` (`/ sum_t m_t w_t` when
    `normalize`), `m_t` the sign-agreement mask (ones when `consensus` is None).
    """
    guard = _checks.Guard()
    deltas = _validate.stack(deltas, name, guard=guard)
    tasks = deltas.shape[0]
    w = _validate.per_task_values(weights, tasks, "weights", name, guard)
    dens = _validate.densities_values(densities, tasks, name, guard)
    if consensus is not None and consensus not in elect.CONSENSUS:
        raise ValueError(f"unknown consensus {consensus!r}; known: {', '.join(elect.CONSENSUS)} or None")
    dt = _validate.work_dtype(deltas.dtype)
    x = deltas.astype(dt)
    if trim is not None:
        x = trim_lib.trim(
            trim,
            x,
            dens,
            key=key,
            calib=calib,
            gamma=gamma,
            epsilon=epsilon,
            rescale=rescale,
            blocksize=blocksize,
            percdamp=percdamp,
            refit=refit,
            name=name,
            count=count,
        )
    else:
        if count != "round":
            raise ValueError(
                f"count={count!r} sets how a trim counts entries, but no trim is given{_where(name)}; "
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
    deltas = _validate.stack(deltas, name, guard=guard)
    w = _validate.per_task_values(weights, deltas.shape[0], "weights", name, guard)
    dt = _validate.work_dtype(deltas.dtype)
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


def task_arithmetic(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    trim: str | None = None,
    rescale: bool | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = 0.01,
    epsilon: Floats = 0.15,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """Task arithmetic (Ilharco et al. 2023): `lambda * sum_t w_t tau_t`.

    Defaults: normalize False, lambda 1, no trimming (pass `trim=` and
    `densities` to trim first, e.g. `trim="sparsegpt"`), rescale off.
    """
    return generalized_task_arithmetic(
        deltas,
        weights,
        densities,
        trim=trim,
        consensus=None,
        normalize=normalize,
        rescale=resolve_rescale(rescale, False, trim),
        lambda_=lambda_,
        key=key,
        calib=calib,
        gamma=gamma,
        epsilon=epsilon,
        blocksize=blocksize,
        percdamp=percdamp,
        refit=refit,
        count=count,
        name=name,
    )


def ties(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    normalize: bool = True,
    lambda_: float = 1.0,
    consensus: str = "sum",
    trim: str = "magnitude",
    rescale: bool | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = 0.01,
    epsilon: Floats = 0.15,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """TIES (Yadav et al. 2023): trim, elect sign, disjoint mean.

    `tau'_t = top-density magnitude of tau_t` (per tensor);
    `s = sign(sum_t w_t tau'_t)` (ties elect +); `m_t = [sign(w_t tau'_t) == s]`;
    result `lambda * sum_t m_t w_t tau'_t / sum_t m_t w_t` (a zero divisor -> 1).
    Defaults: density 1, normalize True, consensus "sum", rescale off, lambda 1.
    The paper uses unweighted disjoint means and its own lambda; the weighted
    election (on `w_t tau'_t`) is mergekit's. With `trim="sparsegpt"` the sign
    is elected on the OBS-compensated vectors. Note: OBS makes each sparse
    `tau'_t` carry its task's whole output `tau_t X`, and the disjoint mean does
    not divide entries that only one task kept, so at low density the merge
    behaves like a *sum* of the tasks' compensated vectors (measured: lower
    error than magnitude TIES against `sum_t tau_t X`, not always against the
    dense TIES merge); tune `lambda_` accordingly.
    """
    return generalized_task_arithmetic(
        deltas,
        weights,
        densities,
        trim=trim,
        consensus=consensus,
        normalize=normalize,
        rescale=resolve_rescale(rescale, False, trim),
        lambda_=lambda_,
        key=key,
        calib=calib,
        gamma=gamma,
        epsilon=epsilon,
        blocksize=blocksize,
        percdamp=percdamp,
        refit=refit,
        count=count,
        name=name,
    )


def dare_linear(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    trim: str = "random",
    rescale: bool | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = 0.01,
    epsilon: Floats = 0.15,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """DARE (Yu et al. 2024) + task arithmetic: `lambda * sum_t w_t m_t tau_t / density_t`.

    `m_t ~ Bernoulli(density_t)` per entry, from `fold_in(key, t)`. Defaults:
    density 1, rescale on (`1/density`, unbiased: `E[result] = sum_t w_t tau_t`),
    normalize off, lambda 1. With `trim="sparsegpt"` rescale defaults off.
    """
    return generalized_task_arithmetic(
        deltas,
        weights,
        densities,
        trim=trim,
        consensus=None,
        normalize=normalize,
        rescale=resolve_rescale(rescale, True, trim),
        lambda_=lambda_,
        key=key,
        calib=calib,
        gamma=gamma,
        epsilon=epsilon,
        blocksize=blocksize,
        percdamp=percdamp,
        refit=refit,
        count=count,
        name=name,
    )


def dare_ties(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
    consensus: str = "sum",
    trim: str = "random",
    rescale: bool | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = 0.01,
    epsilon: Floats = 0.15,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """DARE drop-and-rescale, then TIES sign election and (un-normalized) disjoint sum.

    `tau'_t = m_t tau_t / density_t`; `s = sign(sum_t w_t tau'_t)`;
    result `lambda * sum_t [sign(w_t tau'_t) == s] w_t tau'_t`.
    Defaults (mergekit's): normalize False, rescale on, consensus "sum", lambda 1.
    """
    return generalized_task_arithmetic(
        deltas,
        weights,
        densities,
        trim=trim,
        consensus=consensus,
        normalize=normalize,
        rescale=resolve_rescale(rescale, True, trim),
        lambda_=lambda_,
        key=key,
        calib=calib,
        gamma=gamma,
        epsilon=epsilon,
        blocksize=blocksize,
        percdamp=percdamp,
        refit=refit,
        count=count,
        name=name,
    )


def della(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    epsilon: Floats = 0.15,
    normalize: bool = True,
    lambda_: float = 1.0,
    consensus: str = "sum",
    trim: str = "magprune",
    rescale: bool | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = 0.01,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """DELLA (Deep et al. 2024): MagPrune, sign election, disjoint mean.

    Per row, entries ranked by `|tau|` get keep probability
    `p = density - epsilon + 2 epsilon * rank/(n-1)`, survivors divided by `p`;
    then TIES' election and `lambda * sum m w tau' / sum m w`.
    Defaults (mergekit's): epsilon 0.15, normalize True, rescale on, lambda 1.
    mergekit rescales to match the L1 norm; we divide by `p` as the paper does.
    """
    return generalized_task_arithmetic(
        deltas,
        weights,
        densities,
        trim=trim,
        consensus=consensus,
        normalize=normalize,
        rescale=resolve_rescale(rescale, True, trim),
        lambda_=lambda_,
        key=key,
        calib=calib,
        gamma=gamma,
        epsilon=epsilon,
        blocksize=blocksize,
        percdamp=percdamp,
        refit=refit,
        count=count,
        name=name,
    )


def della_linear(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    epsilon: Floats = 0.15,
    normalize: bool = False,
    lambda_: float = 1.0,
    trim: str = "magprune",
    rescale: bool | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    gamma: Floats = 0.01,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """DELLA MagPrune without sign election: `lambda * sum_t w_t tau'_t`.

    Defaults (mergekit's): epsilon 0.15, normalize False, rescale on (`1/p`), lambda 1.
    """
    return generalized_task_arithmetic(
        deltas,
        weights,
        densities,
        trim=trim,
        consensus=None,
        normalize=normalize,
        rescale=resolve_rescale(rescale, True, trim),
        lambda_=lambda_,
        key=key,
        calib=calib,
        gamma=gamma,
        epsilon=epsilon,
        blocksize=blocksize,
        percdamp=percdamp,
        refit=refit,
        count=count,
        name=name,
    )


def breadcrumbs(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    gamma: Floats = 0.01,
    normalize: bool = False,
    lambda_: float = 1.0,
    trim: str = "breadcrumbs",
    rescale: bool | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    epsilon: Floats = 0.15,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop outliers and the smallest, sum.

    `tau'_t` keeps the entries ranked `[gamma n, gamma n + density n)` by `|tau_t|`
    (descending); result `lambda * sum_t w_t tau'_t`.
    Defaults (mergekit's): gamma 0.01, normalize False, rescale off, lambda 1.
    """
    return generalized_task_arithmetic(
        deltas,
        weights,
        densities,
        trim=trim,
        consensus=None,
        normalize=normalize,
        rescale=resolve_rescale(rescale, False, trim),
        lambda_=lambda_,
        key=key,
        calib=calib,
        gamma=gamma,
        epsilon=epsilon,
        blocksize=blocksize,
        percdamp=percdamp,
        refit=refit,
        count=count,
        name=name,
    )


def breadcrumbs_ties(
    deltas: jax.Array,
    weights: Floats,
    densities: Floats = 1.0,
    *,
    gamma: Floats = 0.01,
    normalize: bool = False,
    lambda_: float = 1.0,
    consensus: str = "sum",
    trim: str = "breadcrumbs",
    rescale: bool | None = None,
    key: jax.Array | None = None,
    calib: Calibration | None = None,
    epsilon: Floats = 0.15,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: bool = False,
    count: str = "round",
    name: str | None = None,
) -> jax.Array:
    """Breadcrumbs trimming, then TIES sign election; un-normalized disjoint sum.

    Defaults (mergekit's): gamma 0.01, normalize False, consensus "sum", rescale off.
    """
    return generalized_task_arithmetic(
        deltas,
        weights,
        densities,
        trim=trim,
        consensus=consensus,
        normalize=normalize,
        rescale=resolve_rescale(rescale, False, trim),
        lambda_=lambda_,
        key=key,
        calib=calib,
        gamma=gamma,
        epsilon=epsilon,
        blocksize=blocksize,
        percdamp=percdamp,
        refit=refit,
        count=count,
        name=name,
    )
