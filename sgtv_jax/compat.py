"""The PyTorch original's API, as thin stateful shells over the functional core.

Names and argument names are the ones users of the original know; they accept
NumPy, JAX or (CPU) torch arrays and return JAX arrays. Every piece of
numerics is delegated: `hessian.py` accumulates, `factor.py` factors, `obs.py`
sweeps. Differences from the original, on purpose:

* `fasterprune` prunes exactly `round((1 - density) * rows * width)` entries
  per block (the original's `<=` threshold pruned extra ties, pruned one entry
  at density 1 and crashed at density 0);
* `get_inverse_hessian` returns the full damped inverse `H^-1` (the original
  returned its Cholesky factor); `prune_task_vector_with_error_correction`
  accepts either (see its docstring);
* nothing falls back silently: an indefinite Hessian raises after damping
  escalation instead of degrading to diagonal scores.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.factor import inverse_factor
from sgtv_jax.hessian import HessianState, hessian_finalize, hessian_init, hessian_update
from sgtv_jax.obs import obs_prune, obs_prune_from_inverse


def _layer_shape(layer_shape) -> tuple[int, int]:
    try:
        rows, cols = (int(n) for n in layer_shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"layer_shape must be (rows, columns), got {layer_shape!r}") from e
    _checks.check_positive_int(rows, "layer_shape[0] (rows)")
    _checks.check_positive_int(cols, "layer_shape[1] (columns)")
    return rows, cols


def _rescale(pruned: jax.Array, density: float | None, rescale: bool) -> jax.Array:
    """DARE-style 1/density; double-counts on top of OBS compensation, so opt-in."""
    return pruned / density if rescale and density is not None and density > 0 else pruned


class HessianCalculator:
    """Accumulates `H = (2/n) sum x x^T` for one linear layer of shape (rows, columns)."""

    def __init__(self, layer_shape, device: Any = None):
        self.rows, self.columns = _layer_shape(layer_shape)
        self.device = device  # kept for signature compatibility; JAX places arrays
        self._state: HessianState | None = hessian_init(self.columns)

    def _live_state(self) -> HessianState:
        if self._state is None:
            raise ValueError("this pruner was freed; create a new one")
        return self._state

    @property
    def H(self) -> jax.Array:
        return self._live_state().hessian

    @property
    def nsamples(self) -> int:
        return int(self._live_state().nsamples)

    def add_batch(self, batch, mask=None) -> None:
        """batch: `[batch, seq, columns]` or `[tokens, columns]` layer inputs."""
        x = _checks.as_array(batch, "batch")
        _checks.require_finite(x, "batch (layer inputs)")
        self._state = hessian_update(self._live_state(), x, mask)

    def get_hessian(self) -> jax.Array:
        """H `[columns, columns]`."""
        return hessian_finalize(self._live_state())

    def _factor(self, percdamp: float):
        factor = inverse_factor(self.get_hessian(), percdamp)
        if not bool(factor.ok):
            raise ValueError(f"Hessian is not positive definite even at percdamp={float(factor.percdamp):.3g}")
        return factor

    def get_inverse_hessian(self, percdamp: float = PERCDAMP) -> jax.Array:
        """The damped inverse `H^-1` `[columns, columns]` (dead columns fixed first)."""
        u = self._factor(percdamp).upper
        return jnp.matmul(u.T, u, precision=jax.lax.Precision.HIGHEST)

    def get_inverse_hessian_diag(self, percdamp: float = PERCDAMP) -> jax.Array:
        """`diag(H^-1)` `[columns]`, without forming `H^-1`."""
        return jnp.sum(self._factor(percdamp).upper ** 2, axis=0)


class SparseGPTTaskVector(HessianCalculator):
    """SparseGPT for task vectors: `add_batch` inputs, then `fasterprune` a delta."""

    def fasterprune(
        self,
        task_vector,
        density: float | None,
        blocksize: int = BLOCKSIZE,
        percdamp: float = PERCDAMP,
        rescale: bool = False,
        prunen: int = 0,
        prunem: int = 0,
        refit: bool = False,
    ) -> jax.Array:
        """Prune `task_vector` `[rows, columns]` with OBS error correction.

        With `prunen`/`prunem` set, N:M pruning replaces `density`; `refit`
        re-solves the kept entries exactly for the final mask (see `obs_prune`).
        """
        if self._state is None:
            raise ValueError("this pruner was freed; create a new one")
        tv = _checks.as_array(task_vector, "task_vector")
        if tv.shape != (self.rows, self.columns):
            raise ValueError(
                f"task_vector shape {tuple(tv.shape)} does not match layer shape ({self.rows}, {self.columns})"
            )
        nm = bool(prunen or prunem)
        pruned, _ = obs_prune(
            tv,
            self.get_hessian(),
            density=None if nm else density,
            prunen=prunen,
            prunem=prunem,
            blocksize=blocksize,
            percdamp=percdamp,
            refit=refit,
        )
        return _rescale(pruned, 1 - prunen / prunem if nm else density, rescale)

    def free(self) -> None:
        self._state = None


def prune_task_vector_with_error_correction(
    task_vector,
    hessian_inv,
    density: float,
    blocksize: int = BLOCKSIZE,
    rescale: bool = False,
    percdamp: float = PERCDAMP,
) -> jax.Array:
    """OBS-prune `task_vector` `[rows, cols]` given an inverse Hessian `[cols, cols]`.

    `hessian_inv` is the full (damped) inverse `H^-1`, or - as the original's
    `get_inverse_hessian` returned - its upper Cholesky factor: a matrix that is
    upper triangular and not symmetric is taken as the factor. `percdamp` is
    accepted for compatibility; an inverse is used as given.
    """
    del percdamp
    hinv = _checks.as_array(hessian_inv, "hessian_inv")
    if hinv.ndim == 2 and bool(jnp.all(jnp.tril(hinv, -1) == 0)) and not bool(jnp.all(hinv == hinv.T)):
        hinv = jnp.matmul(hinv.T, hinv, precision=jax.lax.Precision.HIGHEST)
    pruned, _ = obs_prune_from_inverse(task_vector, hinv, density=density, blocksize=blocksize)
    return _rescale(pruned, density, rescale)


def compute_importance_scores(weights, hessian_inv_diag, eps: float = 1e-10) -> jax.Array:
    """OBS saliency `w^2 / (diag(H^-1) + eps)^2` per entry of `weights` `[rows, cols]`."""
    w = _checks.as_array(weights, "weights")
    d = _checks.as_array(hessian_inv_diag, "hessian_inv_diag")
    if d.shape != w.shape[-1:]:
        raise ValueError(f"hessian_inv_diag must have shape {w.shape[-1:]}, got {d.shape}")
    return w**2 / (d + eps) ** 2


def generate_importance_mask(importance_scores, density: float) -> jax.Array:
    """1.0 for the `round(density * n)` highest scores, 0.0 elsewhere (ties: first index wins).

    Exact count, unlike the original's `>= threshold` which kept every tie.
    """
    s = _checks.as_array(importance_scores, "importance_scores")
    density = _checks.check_density(density)
    keep = round(density * s.size)
    order = jnp.argsort(-s.ravel(), stable=True)
    mask = jnp.zeros(s.size, s.dtype).at[order[:keep]].set(1)
    return mask.reshape(s.shape)


def trim_with_sparsegpt_importance(tv, hessian_inv_diag, density: float) -> jax.Array:
    """Deprecated: masks by OBS saliency *without* error correction."""
    warnings.warn(
        "trim_with_sparsegpt_importance is deprecated: it masks without error correction. "
        "Use prune_task_vector_with_error_correction(task_vector, hessian_inv, density) "
        "or sgtv_jax.obs_prune(delta, hessian, density=...).",
        DeprecationWarning,
        stacklevel=2,
    )
    tv = _checks.as_array(tv, "tv")
    return tv * generate_importance_mask(compute_importance_scores(tv, hessian_inv_diag), density)
