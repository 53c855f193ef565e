"""Settings' defaults and bounds declared once: every signature and config reads these.

`BLOCKSIZE`: columns per lazy-update block of the OBS sweep (SparseGPT's 128);
`PERCDAMP`: damping `percdamp * mean(diag(H))` added to the Hessian's diagonal
(SparseGPT's 0.01). The trims' own defaults (`gamma`, `epsilon`) live in
`sgtv_jax.merge.trim`.
"""

BLOCKSIZE = 128
PERCDAMP = 0.01
MAX_LEARNING_STEPS = 100_000
"""AdaMerging's and WUDI's `steps` bound (their defaults are 100 and 300): a run stays finite."""
DISTILL_TOPK = 256
"""Tokens per position of AdaMerging's cached specialist distributions (`merge.distill`: top k plus a rest bin)."""

MEMORY_BUDGET = 256 << 20
"""Bytes one tensor's merge may hold at once before it is merged in row chunks (`memory_budget`)."""
