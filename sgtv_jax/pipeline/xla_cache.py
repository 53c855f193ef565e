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
stale entry is never used; only programs that took over a second to
compile are stored (JAX's default), a few MB per model.
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
    return path
