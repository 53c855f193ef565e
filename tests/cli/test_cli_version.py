"""`sgtv --version`: the installed distribution's version, whose one source is pyproject.toml."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest

import sgtv_jax
from sgtv_jax import _version
from sgtv_jax.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_version_prints_the_installed_metadata():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-m", "sgtv_jax.cli", "--version"], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == metadata.version("sgtv-jax")


def test_the_one_source_is_pyproject():
    # The installed metadata was built from this tree's pyproject.toml; nothing else writes a number.
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert metadata.version("sgtv-jax") == declared, "reinstall (pip install -e .) after changing the version"
    assert sgtv_jax.__version__ == declared


def test_source_tree_without_metadata_says_so(monkeypatch, capsys):
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_version.metadata, "version", missing)
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == "unknown (not installed)"


def test_every_command_keeps_freed_chunks_in_the_heap(monkeypatch, capsys):
    # The streamed merge's temporaries: without this, each is a fresh mapping that page-faults in.
    import sgtv_jax.merge.streaming as streaming

    calls = []
    monkeypatch.setattr(streaming, "reuse_freed_memory", lambda: calls.append(1) or True)
    assert main(["methods"]) == 0
    assert calls == [1]
    assert "ties" in capsys.readouterr().out
