"""sgtv-jax: Hessian-aware (SparseGPT / OBS) task-vector pruning and model merging in JAX."""

from sgtv_jax.factor import InverseFactor, inverse_factor
from sgtv_jax.hessian import HessianState, hessian_finalize, hessian_init, hessian_update, input_norms
from sgtv_jax.obs import block_prune_counts, obs_prune, obs_prune_from_inverse, obs_sweep

__version__ = "0.1.0"
from sgtv_jax.compat import (
    HessianCalculator,
    SparseGPTTaskVector,
    compute_importance_scores,
    generate_importance_mask,
    prune_task_vector_with_error_correction,
    trim_with_sparsegpt_importance,
)
