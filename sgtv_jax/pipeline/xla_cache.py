"""JAX's persistent compilation cache for the `sgtv` commands.

A calibrated merge compiles one program per layer shape and stage (the OBS
sweep, the refit's conjugate gradient, the fits' solves): on a small model
that is most of the merge. SmolLM2-135M's sparse recipe
(`examples/configs/recommended_sparse.yaml`) compiles each `[1536, 576]`
OBS + refit program in 4.4 s; from this cache it loads in 0.8 s. So the
`sgtv` command keeps XLA's executables on disk and a second merge of the
same shapes (another config, other fine-tunes of the same base) skips the
compiles.

The cache lives in `$SGTV_XLA_CACHE`, default `<sgtv cache>/xla`
(`$SGTV_CACHE` or `~/.cache/sgtv-jax`, where the demo models live);
`SGTV_XLA_CACHE=off` turns it off. A cache the user configured for JAX
(`JAX_COMPILATION_CACHE_DIR` / `jax.config`) is left as it is. JAX keys
each entry by the program, the backend and the jax / jaxlib versions, so a
stale entry is never used. Every program is stored, not only those that
took over a second to compile (JAX's default): the sparse recipe's dozens of
sub-second programs were half its warm merge's compile time (its prune stage
took 35.7 s warm with JAX's threshold, 22.8 s without); a few MB per model.
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` still sets the threshold.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "SGTV_XLA_CACHE"
OFF = ("off", "0", "false", "no")


def cache_dir() -> Path | None:
    """Where the `sgtv` commands keep compiled programs (module doc); None when turned off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    from convert.demo import default_cache_dir  # noqa: PLC0415 - the demo module pulls in GGUF; only here

    return default_cache_dir() / "xla"


def enable() -> Path | None:
    """Turn JAX's persistent compilation cache on at `cache_dir()`; the folder used, or None.

    Leaves a cache directory already configured for JAX alone (returns it).
    """
    current = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]  # a runtime flag
    if current:
        return Path(current)
    path = cache_dir()
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
