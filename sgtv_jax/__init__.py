"""sgtv-jax: Hessian-aware (SparseGPT / OBS) task-vector pruning and model merging in JAX.

The public surface, smallest first:

* functional core - `hessian_init / hessian_update / hessian_finalize`,
  `inverse_factor`, `obs_prune` (with `refit=`), `obs_sweep`;
* merging - `get_method`, `Calibration`; the methods and the whole-model
  `sgtv_jax.merge.merge(method, base, models, ...)` live in `sgtv_jax.merge`;
* the PyTorch original's names - `SparseGPTTaskVector`, `HessianCalculator`,
  `prune_task_vector_with_error_correction`, `TIES`, `DARE`, ...
"""

from sgtv_jax import _version
from sgtv_jax.compat import (
    HessianCalculator,
    SparseGPTTaskVector,
    compute_importance_scores,
    generate_importance_mask,
    prune_task_vector_with_error_correction,
    trim_with_sparsegpt_importance,
)
from sgtv_jax.factor import InverseFactor, inverse_factor
from sgtv_jax.hessian import HessianState, hessian_finalize, hessian_init, hessian_update, input_norms
from sgtv_jax.merge import DARE, TIES, Calibration, available_methods, get_method
from sgtv_jax.obs import block_prune_counts, obs_prune, obs_prune_from_inverse, obs_sweep
from sgtv_jax.refit import refit_kept

# From the installed metadata (pyproject.toml's `version` is the one source; see _version).
__version__ = _version.version()

__all__ = [
    "DARE",
    "Calibration",
    "HessianCalculator",
    "HessianState",
    "InverseFactor",
    "SparseGPTTaskVector",
    "TIES",
    "available_methods",
    "block_prune_counts",
    "compute_importance_scores",
    "generate_importance_mask",
    "get_method",
    "hessian_finalize",
    "hessian_init",
    "hessian_update",
    "input_norms",
    "inverse_factor",
    "obs_prune",
    "obs_prune_from_inverse",
    "obs_sweep",
    "prune_task_vector_with_error_correction",
    "refit_kept",
    "trim_with_sparsegpt_importance",
]
