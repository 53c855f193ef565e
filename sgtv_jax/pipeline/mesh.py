"""The device mesh a merge runs on: one `data` axis over the chosen devices, of one or many processes.

    init_distributed(...)            # multi-host: before anything touches a device
    mesh = make_mesh("all")          # or N: the first N devices (N / processes on every process)
    x = global_rows(mesh, local)     # this process's rows of a batch -> one array sharded over `data`
    s = replicate(mesh, tree)        # weights: every device holds a copy
    a = to_host(x)                   # NumPy on every process (replicated or gathered)

Calibration is data-parallel over the mesh (`streams`); OBS shards a task
stack's rows over this process's devices of the mesh (`local_mesh`,
`shard_rows`); every process repeats the merge of each tensor from the same
replicated Hessian, and only process 0 writes (`is_writer`).

Reproducibility across meshes is float32's, not bit for bit. On the tiny
LLaMA of tests/test_pipeline_mesh.py (8 simulated CPU devices against 1),
the first difference is block 0's `down_proj` Hessian (3e-7 of max |H|):
its input comes out of the gate / up matmuls, which XLA's CPU GEMM rounds
differently when a device holds fewer rows of the batch; the q/k/v, o and
gate/up Hessians of block 0 differ only by the order of the float32 sums
(float64 partials, `hessian_accumulation: float64`, make those equal but
not the activations). Without refit every task vector then agrees within
1.5e-5 of its largest entry and the logits within 2e-6, with no kept entry
flipped, for every Hessian source. Refit re-solves least squares on the kept
entries and multiplies the difference by that system's condition number;
with the `merged` source the next blocks' Hessians inherit it, and at block 2
(H off by 1e-4) a few entries at the exact-k threshold flip: logits within
3e-3. A tie rule cannot remove this: any threshold on a float32 score is
crossed by some perturbation of its inputs.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sgtv_jax.errors import SgtvError

DATA = "data"


class MeshError(SgtvError):
    """A device selection or distributed setup that cannot work (names the flag or key)."""


def init_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join a multi-process run (`jax.distributed.initialize`); returns whether one was joined.

    Arguments left None come from JAX's environment variables
    (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) or from
    the cluster JAX detects (Cloud TPU pod slices, SLURM, ...). Nothing is
    joined when no coordinator is given and none of those variables is set:
    a single process. CPU processes exchange data through gloo (JAX's default
    CPU collectives).
    """
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator is None and "JAX_COORDINATOR_ADDRESS" not in os.environ and num_processes is None:
        return False
    if num_processes is not None and num_processes < 1:
        raise MeshError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise MeshError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
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


def local_mesh(mesh: Mesh) -> Mesh:
    """The mesh of this process's devices (OBS shards rows over it)."""
    return Mesh(np.array(local_devices(mesh)), (DATA,))


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


def shard_rows(mesh: Mesh, x: jax.Array, axis: int) -> jax.Array:
    """`x` with axis `axis` split over `mesh` (a process-local mesh) when it divides evenly, else whole."""
    if mesh.size == 1 or x.shape[axis] % mesh.size:
        return x
    spec = [None] * x.ndim
    spec[axis] = DATA  # type: ignore[call-overload]
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def replicate_local(mesh: Mesh, x: jax.Array) -> jax.Array:
    """`x` on every device of a process-local mesh (no-op on one device)."""
    return x if mesh.size == 1 else jax.device_put(x, replicated(mesh))
