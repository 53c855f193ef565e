"""Orbax checkpoints of Flax NNX models, with architecture and HF config beside them.

Layout of a saved directory::

    DIR/sgtv_model.json   {"format": ..., "model_type": ..., "hf_config": {...}}
    DIR/state/            ocp.StandardCheckpointer checkpoint of nnx.split(model)[1]

Restore rebuilds the model abstractly with ``nnx.eval_shape`` (no memory, no
init compute), restores the state into that structure and merges: bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from convert.errors import ConvertError

META_FILE = "sgtv_model.json"
STATE_DIR = "state"
FORMAT = "sgtv-jax/nnx-orbax/v1"


def _default_build(hf_config: Mapping[str, Any], param_dtype: str = "float32") -> Any:
    import jax.numpy as jnp
    from flax import nnx

    from convert.readers import hf_config_object
    from sgtv_jax.models import build_model

    return build_model(hf_config_object(dict(hf_config)), nnx.Rngs(0), param_dtype=jnp.dtype(param_dtype))


def _param_dtype(model: Any) -> str | None:
    """The dtype shared by all parameters, if there is one."""
    from flax import nnx

    dtypes = {str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return dtypes.pop() if len(dtypes) == 1 else None


def save_orbax(
    model: Any,
    dst: str | Path,
    *,
    hf_config: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Save an NNX model's state and its HF config (a dict) to ``dst``.

    Waits for Orbax's asynchronous write to finish. The checkpoint is written into
    a temporary sibling directory and renamed, so ``dst`` is either complete or
    absent. ``hf_config['model_type']`` names the architecture.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
    if "model_type" not in hf_config:
        raise ConvertError("save_orbax: hf_config has no 'model_type'")
    meta = {"format": FORMAT, "model_type": hf_config["model_type"], "hf_config": dict(hf_config),
            "param_dtype": _param_dtype(model)}
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise ConvertError(f"save_orbax: hf_config is not JSON-serialisable ({e})") from None

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _, state = nnx.split(model)
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(tmp / STATE_DIR, state)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        (tmp / META_FILE).write_text(meta_text + "\n")
        old = None
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
        os.rename(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_orbax_metadata(path: str | Path) -> dict[str, Any]:
    """The ``sgtv_model.json`` of a saved model (model_type, hf_config)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise ConvertError(f"{Path(path)}: not an sgtv-jax Orbax checkpoint (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ConvertError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def restore_orbax(
    path: str | Path,
    *,
    build: Callable[[Mapping[str, Any]], Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Restore a model saved by :func:`save_orbax`; returns ``(model, hf_config)``.

    ``build(hf_config) -> nnx.Module`` constructs the architecture; it is only
    traced under ``nnx.eval_shape``. The default uses ``sgtv_jax.models`` with
    the parameter dtype recorded at save time, so bf16 models restore as bf16.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    path = Path(path).absolute()
    meta = read_orbax_metadata(path)
    hf_config = meta["hf_config"]
    if build is not None:
        abstract = nnx.eval_shape(lambda: build(hf_config))
    else:
        pd = meta.get("param_dtype") or "float32"
        abstract = nnx.eval_shape(lambda: _default_build(hf_config, pd))
    graphdef, abstract_state = nnx.split(abstract)
    ckptr = ocp.StandardCheckpointer()
    try:
        state = ckptr.restore(path / STATE_DIR, abstract_state)
    except Exception as e:  # noqa: BLE001 - orbax raises many types on structure mismatch
        raise ConvertError(f"{path / STATE_DIR}: cannot restore into a {meta['model_type']} model ({e})") from None
    finally:
        ckptr.close()
    return nnx.merge(graphdef, state), hf_config
