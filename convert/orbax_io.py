"""Orbax checkpoints of Flax NNX models, with architecture and HF config beside them.

Layout of a saved directory::

    DIR/sgtv_model.json   {"format": ..., "model_type": ..., "hf_config": {...}}
    DIR/state/            ocp.StandardCheckpointer checkpoint of nnx.split(model)[1]
    DIR/.sgtv-output      marker: written by this tool (see convert.atomic)

Restore rebuilds the model abstractly with ``nnx.eval_shape`` (no memory, no
init compute), restores the state into that structure and merges: bit-exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from convert.atomic import atomic_output
from convert.containment import contained_file, contained_tree
from convert.errors import ConvertError
from convert.model_config import check_model_config
from convert.readers import check_architecture, hf_config_object
from sgtv_jax.errors import short_repr
from sgtv_jax.models import build_model

META_FILE = "sgtv_model.json"
STATE_DIR = "state"
FORMAT = "sgtv-jax/nnx-orbax/v1"


def _default_build(hf_config: Mapping[str, Any], param_dtype: str = "float32") -> Any:

    return build_model(hf_config_object(dict(hf_config)), nnx.Rngs(0), param_dtype=jnp.dtype(param_dtype))


def _param_dtype(model: Any) -> str | None:
    """The dtype shared by all parameters, if there is one."""

    dtypes = {str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return dtypes.pop() if len(dtypes) == 1 else None


def write_orbax(model: Any, directory: str | Path, *, hf_config: Mapping[str, Any]) -> None:
    """Write an NNX model's state and its HF config into an existing ``directory``.

    No atomicity of its own: callers write into the temporary directory of
    ``convert.atomic.atomic_output``. Waits for Orbax's asynchronous write.
    """

    if "model_type" not in hf_config:
        raise ConvertError("save_orbax: hf_config has no 'model_type'")
    meta = {
        "format": FORMAT,
        "model_type": hf_config["model_type"],
        "hf_config": dict(hf_config),
        "param_dtype": _param_dtype(model),
    }
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise ConvertError(f"save_orbax: hf_config is not JSON-serialisable ({e})") from None
    directory = Path(directory).absolute()
    _, state = nnx.split(model)
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(directory / STATE_DIR, state)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    _anonymise_commit_file(directory / STATE_DIR)
    (directory / META_FILE).write_text(meta_text + "\n")


def _anonymise_commit_file(state_dir: Path) -> None:
    """Orbax's commit marker names the absolute path it was written to (our temporary
    directory); keep the marker, which says the save completed, without the path."""
    marker = state_dir / "commit_success.txt"
    if marker.is_file():
        marker.write_text(f"Checkpoint commit was successful to {STATE_DIR}")


def save_orbax(
    model: Any,
    dst: str | Path,
    *,
    hf_config: Mapping[str, Any],
    overwrite: bool = False,
    inputs: Mapping[str, str | Path] | Iterable[str | Path] = (),
) -> Path:
    """Save an NNX model's state and its HF config (a dict) to ``dst``.

    Written through ``convert.atomic.atomic_output``: into a temporary sibling
    renamed at the end, so ``dst`` is either complete or as it was; ``dst`` may
    not overlap any of ``inputs``, and ``overwrite`` replaces only a previous
    output of this tool or an empty directory (the old one is removed only
    after the new one is in place). ``hf_config['model_type']`` names the
    architecture.
    """
    if "model_type" not in hf_config:
        raise ConvertError("save_orbax: hf_config has no 'model_type'")
    with atomic_output(dst, kind="orbax", overwrite=overwrite, inputs=inputs) as tmp:
        write_orbax(model, tmp, hf_config=hf_config)
    return Path(dst).absolute()


PARAM_DTYPES = ("float32", "bfloat16", "float16")
"""The parameter dtypes ``sgtv_model.json`` may record (what `write_orbax` writes)."""


def read_orbax_metadata(path: str | Path) -> dict[str, Any]:
    """The validated ``sgtv_model.json`` of a saved model (format, model_type, hf_config, param_dtype).

    ConvertError naming the file and the field (values truncated) when it is
    not JSON, not an object, of another format, without an ``hf_config``
    object or model_type string, with a dtype other than
    `PARAM_DTYPES` or with bad numbers in ``hf_config``
    (`convert.model_config`): all before any tensor is restored.
    """
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise ConvertError(f"{Path(path)}: not an sgtv-jax Orbax checkpoint (no {META_FILE})")
    contained_file(path, META_FILE, what=META_FILE)
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ConvertError(f"{meta_path}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(meta, dict):
        raise ConvertError(f"{meta_path}: must hold a JSON object, got a JSON {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ConvertError(f"{meta_path}: unknown format {short_repr(meta.get('format'))} (expected {FORMAT})")
    hf_config = meta.get("hf_config")
    if not isinstance(hf_config, dict):
        raise ConvertError(
            f"{meta_path}: hf_config must be a JSON object (the model's config), got {short_repr(hf_config)}"
        )
    if not isinstance(hf_config.get("model_type"), str):
        raise ConvertError(
            f"{meta_path}: hf_config.model_type must be a string, got {short_repr(hf_config.get('model_type'))}"
        )
    if meta.get("model_type") != hf_config["model_type"]:
        raise ConvertError(
            f"{meta_path}: model_type {short_repr(meta.get('model_type'))} differs from hf_config's "
            f"{short_repr(hf_config['model_type'])}"
        )
    pd = meta.get("param_dtype")
    if pd is not None and pd not in PARAM_DTYPES:
        raise ConvertError(f"{meta_path}: param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {short_repr(pd)}")
    check_model_config(hf_config, f"{meta_path}: hf_config")
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

    path = Path(path).absolute()
    meta = read_orbax_metadata(path)
    hf_config = meta["hf_config"]
    if build is not None:
        abstract = nnx.eval_shape(lambda: build(hf_config))
    else:
        check_architecture(hf_config, f"{path / META_FILE}: hf_config")  # before building: named, not a KeyError
        pd = meta.get("param_dtype") or "float32"
        abstract = nnx.eval_shape(lambda: _default_build(hf_config, pd))
    graphdef, abstract_state = nnx.split(abstract)
    contained_tree(path, STATE_DIR, what=f"Orbax {STATE_DIR}")  # orbax reads the tree itself
    ckptr = ocp.StandardCheckpointer()
    try:
        state = ckptr.restore(path / STATE_DIR, abstract_state)
    except Exception as e:  # noqa: BLE001 - orbax raises many types on structure mismatch
        raise ConvertError(f"{path / STATE_DIR}: cannot restore into a {meta['model_type']} model ({e})") from None
    finally:
        ckptr.close()
    return nnx.merge(graphdef, state), hf_config
