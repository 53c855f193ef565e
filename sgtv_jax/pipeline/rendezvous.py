"""A bounded handshake of a multi-host run, before `jax.distributed.initialize`.

JAX's own handshake cannot be bounded from Python: when a process is missing,
its client aborts the whole process (a C++ fatal log, exit 134) after
`initialization_timeout`, with no word about who is missing. So every process
first meets the others here, over plain TCP on the coordinator's address:

* process 0 listens on the coordinator's port and waits until every process
  1..N-1 has said hello (its id and the process count it was given); it prints
  which ids it still waits for, every `NOTICE_S` seconds;
* the others connect (retrying until process 0 listens) and wait for "go";
* then every process closes its socket (the others first, so process 0's port
  is free again at once) and JAX's handshake runs with all of them alive.

Past the timeout, or on a disagreement (another process count, an id twice),
every process raises `MeshError` naming the coordinator and the missing ids.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable

from sgtv_jax.errors import SgtvError

DEFAULT_INIT_TIMEOUT = 120.0
"""Seconds a multi-host run waits for all its processes (`sgtv merge --init-timeout`)."""
NOTICE_S = 10.0
"""Seconds between the 'still waiting' lines."""
_GRACE_S = 5.0
"""Seconds a joining process waits past its own deadline for process 0's verdict: both deadlines fall at
about the same moment, and only process 0 knows which ids are missing."""
_RETRY_S = 0.2


class RendezvousError(SgtvError):
    """Not every process of a multi-host run arrived in time, or they disagree."""


def parse_address(value: str, flag: str = "--coordinator") -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets) -> (host, port); `RendezvousError` naming `flag` otherwise."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RendezvousError(f"{flag} must be HOST:PORT with a port in 1..65535, got {value!r}")
    return host, int(port)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _recv_line(conn: socket.socket, deadline: float) -> str | None:
    """One newline-terminated message, or None (peer closed / deadline)."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        conn.settimeout(min(left, NOTICE_S))
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
        if len(buf) > 65536:
            return None
    return buf.split(b"\n", 1)[0].decode("utf-8", "replace")


def meet(address: str, num_processes: int, process_id: int, timeout: float, say: Callable[[str], None] = _say) -> None:
    """Wait until all `num_processes` processes reached `address` (at most `timeout` seconds)."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    if process_id == 0:
        _host(address, port, num_processes, deadline, timeout, say)
    else:
        _join(address, host, port, num_processes, process_id, deadline, timeout, say)


def _missing(expected: set[int]) -> str:
    return ", ".join(str(i) for i in sorted(expected))


def _host(address: str, port: int, n: int, deadline: float, timeout: float, say: Callable[[str], None]) -> None:
    try:
        if socket.has_dualstack_ipv6():
            srv = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            srv = socket.create_server(("", port))
    except OSError as e:
        raise RendezvousError(
            f"--coordinator {address}: process 0 cannot listen on port {port}: {e.strerror or e}"
        ) from None
    conns: dict[int, socket.socket] = {}
    waiting = set(range(1, n))
    try:
        say(f"process 0: waiting at {address} for process(es) {_missing(waiting)} of {n} (timeout {timeout:g} s)")
        notice = time.monotonic() + NOTICE_S
        while waiting:
            now = time.monotonic()
            if now >= deadline:
                raise RendezvousError(
                    f"--coordinator {address}: process(es) {_missing(waiting)} of {n} did not join within "
                    f"{timeout:g} s (--init-timeout); start every process with --num-processes {n} and its --process-id"
                )
            if now >= notice:
                say(f"process 0: still waiting at {address} for process(es) {_missing(waiting)} of {n}")
                notice = now + NOTICE_S
            srv.settimeout(max(min(deadline, notice) - now, 0.01))
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            hello = _recv_line(conn, min(deadline, time.monotonic() + 5.0))
            try:
                msg = json.loads(hello) if hello else {}
                pid, count = int(msg["process_id"]), int(msg["num_processes"])  # a list: TypeError
            except (ValueError, TypeError, KeyError):
                conn.close()  # not one of ours (a port scan, a stale client): keep waiting
                continue
            problem = None
            if count != n:
                problem = f"process {pid} was started with --num-processes {count}, process 0 with {n}"
            elif pid in conns:
                problem = f"two processes were started with --process-id {pid}"
            elif pid not in waiting:
                problem = f"--process-id {pid} is not in 1..{n - 1}"
            if problem:
                _send(conn, {"error": problem})
                conn.close()
                raise RendezvousError(f"--coordinator {address}: {problem}")
            conns[pid] = conn
            waiting.discard(pid)
        for c in conns.values():
            _send(c, {"go": True})
        for c in conns.values():  # the others close first: this port is free for JAX at once
            _recv_line(c, time.monotonic() + 5.0)
    except BaseException:
        for c in conns.values():
            _send(c, {"error": f"process 0 gave up waiting for process(es) {_missing(waiting)} of {n}"})
        raise
    finally:
        for c in conns.values():
            c.close()
        srv.close()


def _send(conn: socket.socket, msg: dict) -> None:
    try:
        conn.sendall((json.dumps(msg) + "\n").encode())
    except OSError:
        pass


def _join(
    address: str, host: str, port: int, n: int, pid: int, deadline: float, timeout: float, say: Callable[[str], None]
) -> None:
    said = False
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 5.0), 0.01))
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"--coordinator {address}: process 0 did not answer within {timeout:g} s (--init-timeout); "
                    f"start process 0 on that host and port ({e.strerror or e})"
                ) from None
            if not said:
                say(f"process {pid}: waiting for process 0 at {address} (timeout {timeout:g} s)")
                said = True
            time.sleep(_RETRY_S)
    try:
        _send(conn, {"process_id": pid, "num_processes": n})
        reply = _recv_line(conn, deadline + _GRACE_S)
        msg = json.loads(reply) if reply else {}
        if not isinstance(msg, dict) or not msg.get("go"):
            why = msg.get("error") if isinstance(msg, dict) else None
            raise RendezvousError(
                f"--coordinator {address}: "
                + (why or f"not every process of {n} joined within {timeout:g} s (--init-timeout)")
            )
    finally:
        conn.close()
