"""The merge pipeline: YAML config, calibration, block-by-block OBS merge, check, evaluation.

    cfg = load_config("merge.yaml")          # mergekit YAML + our keys, validated
    check_config(cfg)                         # architectures, tensors, vocab, data: seconds
    report = run_merge(cfg, "out/")           # sequential merge, atomic export, JSON report

CLI: `sgtv merge CONFIG OUT`, `sgtv check CONFIG`, `sgtv eval MODEL_DIR`, `sgtv demo`.
"""

from sgtv_jax.pipeline.calibration import CalibrationError, CalibrationSet, load_calibration
from sgtv_jax.pipeline.check import CheckResult, check_config
from sgtv_jax.pipeline.config import (
    CalibrationConfig,
    ConfigError,
    MergeConfig,
    ModelEntry,
    load_config,
    parse_config,
    resolve_spec,
)

# The merge driver imports Flax, the converters and matplotlib: loaded on first use, so that
# the `sgtv` command line (which imports this package) starts quickly.
_LAZY = {"MergeRun", "merge_tensor", "run_merge"}


def __getattr__(name: str):
    if name in _LAZY:
        from sgtv_jax.pipeline import sequential

        return getattr(sequential, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CalibrationConfig",
    "CalibrationError",
    "CalibrationSet",
    "CheckResult",
    "ConfigError",
    "MergeConfig",
    "MergeRun",
    "ModelEntry",
    "check_config",
    "load_calibration",
    "load_config",
    "merge_tensor",
    "parse_config",
    "resolve_spec",
    "run_merge",
]
