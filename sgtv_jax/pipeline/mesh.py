"""The device mesh a merge runs on: one `data` axis over the chosen devices, of one or many processes.

    init_distributed(...)            # multi-host: before anything touches a device (bounded wait)
    mesh = make_mesh("all")          # or N: the first N devices (N / processes on every process)
    x = global_rows(mesh, local)     # this process's rows of a batch -> one array sharded over `data`
    s = replicate(mesh, tree)        # weights: every device holds a copy
    a = to_host(x)                   # NumPy on every process (replicated or gathered)

Calibration is data-parallel over the mesh (`streams`); every process merges
each tensor on its first device from the same replicated Hessian, and only
process 0 writes (`is_writer`).

The same config gives the same model on any mesh, bit for bit: every device
runs `batch_size` windows per step (the shapes of a one-device run; XLA's CPU
matmuls round a row differently when the batch around it has another size),
the chunk Grams are summed in window order (`streams.HessianSum`), and OBS
does not split rows over devices (a row split changes its matmuls' shapes,
hence their rounding, and a kept entry at the exact-k threshold can flip).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sgtv_jax.errors import SgtvError
from sgtv_jax.pipeline.rendezvous import DEFAULT_INIT_TIMEOUT, meet, parse_address

DATA = "data"


class MeshError(SgtvError):
    """A device selection or distributed setup that cannot work (names the flag or key)."""


def init_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: float = DEFAULT_INIT_TIMEOUT,
) -> bool:
    """Join a multi-process run (`jax.distributed.initialize`); returns whether one was joined.

    Arguments left None come from JAX's environment variables
    (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); given
    one, all three must be known. Nothing is joined when none is: a single
    process. Every process first meets the others (`rendezvous.meet`, at most
    `timeout` seconds, then `MeshError` naming the coordinator and the missing
    process ids) because JAX's own handshake aborts the process when one is
    missing. CPU processes exchange data through gloo (JAX's default CPU collectives).
    """
    values = {
        "--coordinator": coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
        "--num-processes": num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES"),
        "--process-id": process_id if process_id is not None else _env_int("JAX_PROCESS_ID"),
    }
    if all(v is None for v in values.values()):
        return False
    missing = [flag for flag, v in values.items() if v is None]
    if missing:
        given = ", ".join(flag for flag in values if flag not in missing)
        raise MeshError(
            f"{given} needs {' and '.join(missing)} too (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
            "JAX_PROCESS_ID): a multi-host run names the coordinator, the process count and this process's id"
        )
    address, n, pid = str(values["--coordinator"]), int(values["--num-processes"]), int(values["--process-id"])  # type: ignore[arg-type]
    parse_address(address)
    if n < 1:
        raise MeshError(f"--num-processes must be >= 1, got {n}")
    if not 0 <= pid < n:
        raise MeshError(f"--process-id must be in [0, {n}), got {pid}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise MeshError(f"--init-timeout must be a positive number of seconds, got {timeout!r}")
    start = time.monotonic()
    if n > 1:
        meet(address, n, pid, timeout)
    left = max(math.ceil(timeout - (time.monotonic() - start)), 10)  # everyone is up: JAX's handshake is quick
    jax.distributed.initialize(address, num_processes=n, process_id=pid, initialization_timeout=left)
    return True


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise MeshError(f"environment variable {name} must be an integer, got {v!r}") from None


def make_mesh(devices: str | int | None = "all") -> Mesh:
    """A 1-D mesh (axis `data`) over all devices of every process, or the first N.

    N must be a multiple of the process count: each process gives N / P of its
    own devices, so every process holds a contiguous block of the data axis.
    """
    procs = jax.process_count()
    if devices is None or devices == "all":
        chosen = list(jax.devices())
    else:
        n = devices
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise MeshError(f"devices must be 'all' or a positive integer, got {devices!r}")
        per, rest = divmod(n, procs)
        local = len(jax.local_devices())
        if rest or per > local:
            raise MeshError(
                f"devices: {n} must be a multiple of the {procs} process(es), each with at most {local} devices"
            )
        chosen = [d for p in range(procs) for d in sorted_devices(p)[:per]]
    chosen.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(chosen), (DATA,))


def sorted_devices(process: int) -> list[Any]:
    return sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)


def describe(mesh: Mesh) -> dict[str, Any]:
    """The report's `mesh`: device count, kinds, platform, processes, this process's share."""
    devs = list(mesh.devices.flat)
    return {
        "axis": DATA,
        "devices": len(devs),
        "kinds": sorted({d.device_kind for d in devs}),
        "platform": devs[0].platform,
        "processes": jax.process_count(),
        "local_devices": len(local_devices(mesh)),
    }


def local_devices(mesh: Mesh) -> list[Any]:
    """This process's devices of `mesh`, in mesh order."""
    me = jax.process_index()
    return [d for d in mesh.devices.flat if d.process_index == me]


def is_writer() -> bool:
    """Whether this process writes the output (process 0)."""
    return jax.process_index() == 0


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Axis 0 over `data`, the rest whole."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_row_range(mesh: Mesh, rows: int) -> tuple[int, int]:
    """The rows [start, stop) of a `rows`-row batch sharded over `data` that this process holds.

    `rows` must be a multiple of the mesh size.
    """
    per = rows // mesh.size
    pos = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    return pos[0] * per, (pos[-1] + 1) * per


def global_rows(mesh: Mesh, local: Any) -> jax.Array:
    """This process's rows `local` `[rows / P, ...]` of a batch as one array sharded over `data`."""
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    return jax.make_array_from_process_local_data(data_sharding(mesh, local.ndim), local, shape)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Every array leaf of `tree` copied to every device of `mesh` (the same value on every process)."""
    sharding = replicated(mesh)

    def put(a: Any) -> Any:
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def to_local(x: jax.Array) -> jax.Array:
    """A replicated (or single-process) array as an array of this process's first device."""
    if x.is_fully_addressable:
        return x
    if not x.is_fully_replicated:
        x = jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)  # type: ignore[attr-defined]
    return x.addressable_data(0)


def to_host(x: jax.Array) -> np.ndarray:
    """NumPy copy of `x` on every process (gathers a sharded multi-process array)."""
    return np.asarray(to_local(x))
