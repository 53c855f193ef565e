"""The PyTorch original's `TIES` and `DARE` classes, as thin wrappers over `merge`.

    merged = TIES().merge(weights, base, [ft_1, ft_2], densities,
                          hessian_invs=[h1_inv, h2_inv], use_sparsegpt=True)

`base_model_parameters` is one tensor (then `ft_models_parameters` is a list of
tensors and the result is one tensor) or a model, `name -> tensor` (then the
fine-tuned entries are models too and the result is a dict). NumPy, JAX and
torch (CPU) tensors are accepted; results are JAX arrays.

Calibration statistics (only used with `use_sparsegpt=True`), per the rule:

* `hessian_invs=`: full inverse Hessians `[in, in]` (the original's argument),
  or their upper Cholesky factors `U` (`H^-1 = U^T U`; recognised as an
  upper-triangular, non-symmetric matrix, as in `sgtv_jax.compat`); no
  dead-column fix or damping can be applied to an inverse (damp before inverting);
* `hessians=`: plain Hessians `H` (preferred: dead columns and damping handled).

Give one or the other, never both; nothing is guessed from the matrices. For a
single tensor pass a list with one matrix per model (or one shared matrix); for
a model a dict `name -> matrix or list`. Tensors of a model without an entry
are trimmed by the method's data-free trim (magnitude for TIES, random for DARE).

Differences from the original: the sign is elected on weighted task vectors
(mergekit's order; the original elected on unweighted ones, which differs only for
unequal weights); magnitude trimming keeps exactly `round(density * n)` entries
(the original kept every entry tied with the threshold); NaN/Inf task vectors raise
instead of being zeroed with a warning; DARE's `1/density` rescale defaults off
with SparseGPT trimming (the original rescaled the OBS-compensated vectors, which
double-counts); `device` is ignored (JAX places arrays); `importance_masks` is
not supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sgtv_jax import _checks
from sgtv_jax.defaults import BLOCKSIZE, PERCDAMP
from sgtv_jax.merge.model import merge

_SINGLE = "tensor"


def _full_inverse(m: jax.Array) -> jax.Array:
    """The original's `hessian_invs` entry as a full inverse: an upper-triangular,
    non-symmetric matrix is the upper Cholesky factor `U` of `H^-1` (what the
    original's `get_inverse_hessian` returned) and becomes `U^T U` - the same rule
    as `sgtv_jax.compat.prune_task_vector_with_error_correction`."""
    if m.ndim == 2 and bool(jnp.all(jnp.tril(m, -1) == 0)) and not bool(jnp.all(m == m.T)):
        return jnp.matmul(m.T, m, precision=jax.lax.Precision.HIGHEST)
    return m


def _stack_stats(value: Any, inverse: bool) -> Any:
    fix = _full_inverse if inverse else (lambda m: m)
    if isinstance(value, (list, tuple)):
        return jnp.stack([fix(_checks.as_array(v, "hessian")) for v in value])
    return fix(_checks.as_array(value, "hessian"))


class _CompatMerge:
    method = ""
    data_free_trim = ""

    def __init__(self, config: Any = None):
        self.config = config

    def merge(
        self,
        weights: Sequence[float],
        base_model_parameters: Any,
        ft_models_parameters: Sequence[Any],
        densities: Sequence[float],
        device: Any = None,
        hessian_invs: Any = None,
        importance_masks: Any = None,
        use_sparsegpt: bool = False,
        blocksize: int = BLOCKSIZE,
        *,
        hessians: Any = None,
        percdamp: float = PERCDAMP,
        seed: int = 0,
        layout: str = "torch",
        **params: Any,
    ) -> Any:
        """Merged parameters (a tensor, or a dict for a model); extra `params` go to the method.

        `device` is accepted for the original's signature; JAX places arrays.
        """
        del device
        if importance_masks is not None:
            raise ValueError(
                "importance_masks is not supported; pass hessians= (or hessian_invs=) with "
                "use_sparsegpt=True for SparseGPT trimming"
            )
        if hessian_invs is not None and hessians is not None:
            raise ValueError("give either hessian_invs (full inverse Hessians) or hessians, not both")
        single = not isinstance(base_model_parameters, Mapping)
        if single:
            base = {_SINGLE: _checks.as_array(base_model_parameters, "base_model_parameters")}
            models = [{_SINGLE: _checks.as_array(m, "ft_models_parameters")} for m in ft_models_parameters]
        else:
            base = {k: _checks.as_array(v, k) for k, v in base_model_parameters.items()}
            models = [{k: _checks.as_array(v, k) for k, v in m.items()} for m in ft_models_parameters]
        kwargs: dict[str, Any] = dict(weights=list(weights), densities=list(densities), seed=seed, layout=layout)
        if use_sparsegpt:
            stats = hessian_invs if hessian_invs is not None else hessians
            if stats is None:
                raise ValueError("hessian_invs (full inverse Hessians) or hessians is required when use_sparsegpt=True")
            if single:
                stats = {_SINGLE: stats}
            stats = {k: _stack_stats(v, hessian_invs is not None) for k, v in stats.items()}
            kwargs["hessian_invs" if hessian_invs is not None else "hessians"] = stats
            known = set(stats)
            fallback = self.data_free_trim
            kwargs["trim"] = lambda name: "sparsegpt" if name in known else fallback
            kwargs["blocksize"] = blocksize
            kwargs["percdamp"] = percdamp
        merged = merge(self.method, base, models, **kwargs, **params)
        return merged[_SINGLE] if single else merged


class TIES(_CompatMerge):
    """The original's TIES: trim (magnitude or SparseGPT), elect sign, disjoint mean.

    `merge(...)` = `sgtv_jax.merge.merge("ties", ...)`: normalize on, rescale
    off, consensus "sum"; see the module doc for the arguments.
    """

    method = "ties"
    data_free_trim = "magnitude"


class DARE(_CompatMerge):
    """The original's DARE: drop (random or SparseGPT), rescale, weighted sum.

    `merge(...)` = `sgtv_jax.merge.merge("dare_linear", ...)`: rescale
    `1/density` on for random drops and off by default with SparseGPT (pass
    `rescale=True` for the original's behaviour), normalize off. `seed` makes the
    drops reproducible (bit-identical per seed).
    """

    method = "dare_linear"
    data_free_trim = "random"
