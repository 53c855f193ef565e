"""One BLAS / LAPACK thread while a merge runs on the CPU.

On the CPU, XLA runs `jnp.linalg.solve` / `lu` / `cholesky` (RegMean's and
WUDI's solves, OBS's Cholesky) as calls into the OpenBLAS that scipy ships
(jaxlib's LAPACK is `scipy.linalg.cython_lapack`). That OpenBLAS starts its
own thread pool beside XLA's; on a busy or small machine its spinning
threads fight XLA's and each other: a `[576, 576]` LU took 0.43 s with the
default 2 threads and 0.02 s with one on a loaded 2-core machine (see
docs/benchmarks.md, "Calibrated fits against TIES"). One thread also makes a
solve's bits independent of the machine's core count: OpenBLAS's threaded
factorisations round differently for each thread count (the same bits run
to run for a fixed count).

`one_lapack_thread` limits every BLAS library of the process to one thread
(`threadpoolctl`) for the duration of a call and restores the counts after.
It does nothing on other backends, or when the user chose a count with
`OPENBLAS_NUM_THREADS` / `OMP_NUM_THREADS` (their choice wins).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax

F = TypeVar("F", bound=Callable[..., Any])
USER_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


@contextlib.contextmanager
def one_lapack_thread() -> Iterator[None]:
    """Within the block, BLAS / LAPACK run single-threaded (CPU backend, no user setting; module doc)."""
    if jax.default_backend() != "cpu" or any(v in os.environ for v in USER_SETTINGS):
        yield
        return
    # loads the OpenBLAS that XLA's CPU LAPACK calls use (jaxlib opens it only at the first solve),
    # so that threadpoolctl finds and limits it
    importlib.import_module("scipy.linalg.cython_lapack")
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def with_one_lapack_thread(fn: F) -> F:
    """`fn` run inside `one_lapack_thread` (a decorator)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with one_lapack_thread():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
