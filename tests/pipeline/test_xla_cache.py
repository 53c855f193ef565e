"""sgtv's persistent compilation cache: where it lives, how it is turned off, and that it is used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import pytest

from sgtv_jax.pipeline import xla_cache


@pytest.fixture
def no_jax_cache():
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SGTV_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("SGTV_XLA_CACHE", raising=False)
    assert xla_cache.cache_dir() == tmp_path / "c" / "xla"
    monkeypatch.setenv("SGTV_XLA_CACHE", str(tmp_path / "x"))
    assert xla_cache.cache_dir() == tmp_path / "x"
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv("SGTV_XLA_CACHE", off)
        assert xla_cache.cache_dir() is None


def test_enable_sets_jax_cache_and_leaves_a_users_own(monkeypatch, tmp_path, no_jax_cache):
    monkeypatch.setenv("SGTV_XLA_CACHE", "off")
    assert xla_cache.enable() is None and not jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("SGTV_XLA_CACHE", str(tmp_path / "x"))
    assert xla_cache.enable() == tmp_path / "x"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "x")
    monkeypatch.setenv("SGTV_XLA_CACHE", str(tmp_path / "other"))
    assert xla_cache.enable() == tmp_path / "x"  # already configured: kept


PROGRAM = """
import jax, jax.numpy as jnp
from sgtv_jax.pipeline import xla_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
xla_cache.enable()  # stores every program, even this sub-second one
jax.jit(lambda a: jnp.linalg.cholesky(a @ a.T + jnp.eye(64)))(jnp.ones((64, 64))).block_until_ready()
print(sum(e.endswith("/cache_hits") for e in events), sum(e.endswith("/cache_misses") for e in events))
"""


def test_a_second_process_reads_what_the_first_wrote(tmp_path):
    env = {"SGTV_XLA_CACHE": str(tmp_path / "xla"), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[2]
    run = [sys.executable, "-c", PROGRAM]
    first = subprocess.run(run, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=True)
    written = sorted(p.name for p in (tmp_path / "xla").iterdir())
    assert written, "the first process stored no compiled program"
    second = subprocess.run(run, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=True)
    hits, misses = map(int, first.stdout.split())
    assert hits == 0 and misses > 0
    assert list(map(int, second.stdout.split())) == [misses, 0]  # every program the first compiled: loaded
