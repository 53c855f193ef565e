"""`sgtv moe`: build a mixture-of-experts checkpoint from dense fine-tunes of one base (mergekit-moe's job).

`config` reads the YAML, `gates` holds the router rules, `routers` applies
them (``calibrated``: through the MoE itself), `build` writes the checkpoint.
Documented in docs/moe.md.
"""

from sgtv_jax.moe.build import EXPERT_LAYOUTS, run_moe
from sgtv_jax.moe.config import MoeConfig, load_moe_config

__all__ = ["EXPERT_LAYOUTS", "MoeConfig", "load_moe_config", "run_moe"]
