"""`lapack_threads.one_lapack_thread`: one BLAS / LAPACK thread while `run_merge` runs on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from sgtv_jax.pipeline.config import parse_config
from sgtv_jax.pipeline.lapack_threads import USER_SETTINGS, one_lapack_thread
from sgtv_jax.pipeline.sequential import run_merge
from tests.helpers import tiny_models as H

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the limit applies on the CPU backend only")


def _counts() -> dict[str, int]:
    """Thread count of every BLAS library loaded in this process, by file."""
    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


@pytest.fixture
def two_threads(monkeypatch):
    """Every BLAS at 2 threads (a count the limit must change), no user setting in the environment."""
    for v in USER_SETTINGS:
        monkeypatch.delenv(v, raising=False)
    jnp.linalg.solve(jnp.eye(2), jnp.ones(2)).block_until_ready()  # jaxlib has opened its LAPACK
    with threadpool_limits(limits=2, user_api="blas"):
        before = _counts()
        assert before and set(before.values()) == {2}
        yield before


def test_one_thread_inside_and_the_counts_restored_after(two_threads):
    with one_lapack_thread():
        inside = _counts()
    assert inside.keys() >= two_threads.keys() and set(inside.values()) == {1}
    assert _counts() == two_threads


def test_a_user_setting_wins(two_threads, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with one_lapack_thread():
        assert _counts() == two_threads


class _Recording(dict):
    """A `hessian_sink` that notes the BLAS thread counts whenever the merge stores a Hessian."""

    seen: list[dict[str, int]]

    def __setitem__(self, key, value):
        self.seen.append(_counts())
        super().__setitem__(key, value)


def test_run_merge_solves_with_one_thread_and_gives_the_threads_back(two_threads, tmp_path):
    paths = H.make_family(tmp_path, "llama", layers=1)
    raw = H.config_dict(paths, tmp_path, merge_method="regmean", hessian_source="per_task", parameters={})
    raw.pop("trim")
    for m in raw["models"]:
        m["parameters"] = {"weight": 1.0}
    sink = _Recording()
    sink.seen = []
    run_merge(parse_config(raw), tmp_path / "out", progress=False, hessian_sink=sink)
    assert sink.seen and all(set(c.values()) == {1} for c in sink.seen)
    assert _counts() == two_threads
    assert all(np.isfinite(h).all() for h in sink.values())
