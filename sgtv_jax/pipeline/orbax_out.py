"""Write a merge as an Orbax checkpoint (the `--format orbax` of `sgtv merge`), atomically."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from convert.atomic import atomic_output
from convert.orbax_io import write_orbax
from sgtv_jax.models import build_abstract_model
from sgtv_jax.pipeline.arch import Arch


def export_orbax(
    tensors: Iterable[tuple[str, np.ndarray]],
    out: Path,
    *,
    arch: Arch,
    dtype: np.dtype,
    overwrite: bool,
    finalize: Callable[[Path], None],
    inputs: dict[str, str],
) -> None:
    """Collect the merged HF-named `tensors` into a Flax model and write it to `out` (Orbax).

    Parameters are kept in `dtype` (the config's output dtype, as the HF export
    writes them). `finalize(tmp)` adds the report files before the directory
    is committed; `inputs` are the paths `out` may not overlap.
    """
    merged: dict[str, Any] = dict(tensors)
    model = build_abstract_model(arch.hf_obj, param_dtype=jnp.dtype(dtype))
    arch.name_map.load_hf_state_dict_into_model(model, merged, strict=True)
    del merged
    with atomic_output(out, kind="orbax", overwrite=overwrite, inputs=inputs) as tmp:
        write_orbax(model, tmp, hf_config=arch.hf_config)
        finalize(tmp)
