"""Write an output directory atomically, and replace only what this tool wrote.

Every writer (HF export, Orbax export, ``sgtv convert``, ``sgtv merge``) goes
through :func:`atomic_output`::

    with atomic_output(out, kind="hf", overwrite=..., inputs=[base_dir]) as tmp:
        ... write files into tmp ...

Guarantees:

* The output is built in a hidden sibling ``.OUT.partial-<pid>-<random>``
  carrying a marker (``.sgtv-partial``: tool, pid, host), so a later run can
  tell a leftover of a killed run from someone else's folder.
* The finished output carries ``.sgtv-output`` (tool, version, kind). With
  ``overwrite`` only such a directory, or an empty one, is replaced; anything
  else (a file, a foreign or non-empty directory, the current directory) is
  refused before any work, naming what would have been deleted. A symlink at
  OUT is followed: its target is what gets replaced (under the same rule), the
  link stays.
* OUT may not be, contain or lie inside any input (:func:`check_output_target`).
* The new output is complete before the old one goes: old renamed aside, new
  renamed into place, old deleted; if the second rename fails the old one is
  put back.
* Leftover ``.OUT.partial-*`` folders of killed runs (our marker, process not
  alive on this host) are removed, each with a note.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from convert.errors import ConvertError
from sgtv_jax._version import DISTRIBUTION, version

TOOL = DISTRIBUTION
OUTPUT_MARKER = ".sgtv-output"
PARTIAL_MARKER = ".sgtv-partial"

Notify = Callable[[str], None]
Inputs = Mapping[str, "str | Path"] | Iterable["str | Path"]


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


def _real(p: str | Path) -> str:
    return os.path.realpath(os.path.abspath(p))


def labelled_inputs(inputs: Inputs) -> list[tuple[str, str]]:
    """``(label, path)`` pairs from a ``label -> path`` mapping or plain paths (label "input")."""
    if isinstance(inputs, Mapping):
        return [(str(k), str(v)) for k, v in inputs.items()]
    return [("input", str(p)) for p in inputs]


def check_output_target(out: str | Path, inputs: Inputs) -> None:
    """Refuse an output path that is, contains or lies inside any input (symlinks resolved).

    ``inputs``: paths, or a mapping ``label -> path`` (e.g. ``"base_model"``)
    so the message names the role. Files an input directory links to (e.g. a
    HF cache snapshot's links into ``blobs/``) count as inputs too.
    Raises ConvertError naming OUT and the input.
    """
    target = _real(out)
    checks: list[tuple[str, str, str]] = []  # (label, as given, real path)
    for label, p in labelled_inputs(inputs):
        checks.append((label, p, _real(p)))
        if os.path.isdir(p):
            with contextlib.suppress(OSError):
                for entry in os.scandir(p):
                    if entry.is_symlink() and entry.is_file():  # e.g. a cache link into blobs/
                        checks.append((label, f"{entry.path} (a link)", _real(entry.path)))
    for label, given, real in checks:
        if target == real:
            rel = "is"
        elif _inside(target, real):
            rel = "lies inside"
        elif _inside(real, target):
            rel = "contains"
        else:
            continue
        where = given if real == given else f"{given} -> {real}"
        shown = str(out) if target == os.path.abspath(out) else f"{out} (-> {target})"
        raise ConvertError(
            f"output {shown} {rel} {label} {where}; writing or replacing it could destroy an input: "
            "choose an output directory outside every input"
        )


def read_marker(directory: str | Path, name: str = OUTPUT_MARKER) -> dict[str, Any] | None:
    """The JSON marker ``name`` in ``directory`` if it is one of ours, else None."""
    path = Path(directory) / name
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _leftovers(target: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Our partial / set-aside folders of OUT whose writer is dead on this host."""
    found = []
    for kind in ("partial", "old"):
        for p in sorted(target.parent.glob(f".{target.name}.{kind}-*")):
            if p.is_symlink() or not p.is_dir():
                continue
            # A finished-but-not-renamed partial has swapped its partial marker for the output marker.
            marker = read_marker(p, PARTIAL_MARKER) or (read_marker(p) if kind == "partial" else None)
            if marker is None or marker.get("host") != socket.gethostname():
                continue  # not ours, or written on another machine: cannot tell if it is alive
            pid = marker.get("pid")
            if isinstance(pid, int) and pid > 0 and not _pid_alive(pid):
                found.append((p, marker))
    return found


def remove_leftovers(out: str | Path, notify: Notify | None = None) -> list[str]:
    """Remove leftovers of killed runs into ``out``; returns (and notifies) one message per folder.

    A ``.OUT.partial-*`` folder is removed only if it carries our partial
    marker and its process is gone. A ``.OUT.old-*`` folder (a previous output
    set aside by a run killed between its two renames) is put back as OUT when
    OUT is missing, else removed.
    """
    notify = notify or _note
    target = Path(_real(out))
    msgs = []
    for p, marker in _leftovers(target):
        if p.name.startswith(f".{target.name}.old-") and not os.path.lexists(target):
            os.rename(p, target)
            (target / PARTIAL_MARKER).unlink(missing_ok=True)
            msg = f"restored the previous output {target} from {p.name} (left by a killed run, pid {marker['pid']})"
        else:
            shutil.rmtree(p)
            msg = f"removed {p}, left over from a killed run into {target} (pid {marker['pid']})"
        notify(msg)
        msgs.append(msg)
    return msgs


def _describe(entries: list[str]) -> str:
    shown = ", ".join(sorted(entries)[:5])
    more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown}{more})"


def prepare_output(
    out: str | Path,
    *,
    overwrite: bool,
    inputs: Inputs = (),
    notify: Notify | None = None,
) -> Path:
    """Check ``out`` before any work; returns the real path that will be written.

    Refuses (ConvertError naming the path): OUT overlapping an input; OUT equal
    to or containing the current directory; an existing OUT without
    ``overwrite``; with ``overwrite``, a file, a dangling symlink, or a
    non-empty directory without our ``.sgtv-output`` marker (naming what would
    have been deleted). Removes leftovers of killed runs (see
    :func:`remove_leftovers`).
    """
    given = str(out)
    check_output_target(out, inputs)
    target = Path(_real(out))
    cwd = _real(os.getcwd())
    if _inside(cwd, str(target)):
        what = "is the current directory" if str(target) == cwd else "contains the current directory"
        raise ConvertError(f"output {given} {what}; refusing to write or replace it: give a new directory name")
    if os.path.islink(given) and not os.path.exists(given):
        raise ConvertError(
            f"output {given} is a symlink to {os.readlink(given)}, which does not exist; "
            "remove the link or create its target"
        )
    if os.path.lexists(target):
        if not overwrite and not target.is_dir():
            raise ConvertError(
                f"{given}: already exists and is {_kind(target)}, not a directory; give a new directory name"
            )
        if not overwrite:
            raise ConvertError(f"{given}: already exists (pass --overwrite to replace it)")
        via = f" (the target of symlink {given})" if os.path.islink(given) else ""
        if not target.is_dir():
            raise ConvertError(
                f"{given}{via}: is {_kind(target)}, not a directory; --overwrite replaces only an output "
                "directory written by sgtv-jax or an empty directory; give a new directory name"
            )
        entries = os.listdir(target)
        if entries and read_marker(target) is None:
            raise ConvertError(
                f"{target}{via}: exists and is not an output of sgtv-jax (no {OUTPUT_MARKER} marker); "
                f"--overwrite would delete its {_describe(entries)}: refusing. Remove it yourself or "
                "choose another output directory"
            )
    remove_leftovers(target, notify)
    return target


def _kind(path: Path) -> str:
    """What a non-directory `path` is, for messages: "a file", "a character device" (/dev/null), ..."""
    mode = os.stat(path).st_mode
    for test, what in (
        (stat.S_ISREG, "a file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a directory"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _replaceable(target: Path) -> bool:
    return target.is_dir() and not target.is_symlink() and (not os.listdir(target) or read_marker(target) is not None)


def commit(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename finished ``tmp`` to ``target``, replacing a previous output only if allowed.

    The old output is renamed aside first and deleted only once the new one is
    in place; if the new one cannot be put in place the old one is restored.
    """
    old = None
    if os.path.lexists(target):
        if not overwrite:
            raise ConvertError(f"{target}: appeared while writing; not replacing it")
        if not _replaceable(target):
            raise ConvertError(
                f"{target}: changed while writing and is no longer an output of sgtv-jax "
                "or an empty directory; not replacing it"
            )
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Mark it before it moves, so a run killed between the two renames leaves
        # something `remove_leftovers` recognises and restores.
        _write_json(target / PARTIAL_MARKER, _partial_marker())
        try:
            os.rename(target, old)
        except BaseException:
            (target / PARTIAL_MARKER).unlink(missing_ok=True)
            raise
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
            (target / PARTIAL_MARKER).unlink(missing_ok=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to the file ``path`` whole or not at all; returns ``path``.

    The bytes go to a hidden sibling ``.NAME.partial-<pid>-<random>`` first,
    which is then renamed over ``path`` (one rename: a reader sees the old file
    or the new one, never half of it); on any failure the sibling is removed.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def mark_output(directory: str | Path, kind: str) -> None:
    """Write the ``.sgtv-output`` marker: ``directory`` is ours to replace later."""
    _write_json(Path(directory) / OUTPUT_MARKER, {**_partial_marker(), "version": version(), "kind": kind})


def _partial_marker() -> dict[str, Any]:
    return {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname()}


@contextlib.contextmanager
def atomic_output(
    out: str | Path,
    *,
    kind: str,
    overwrite: bool = False,
    inputs: Inputs = (),
    notify: Notify | None = None,
) -> Iterator[Path]:
    """Yield a fresh hidden directory to write into; on success it becomes ``out``.

    ``kind`` (e.g. "hf", "orbax") is recorded in the output marker. On any
    exception the partial directory is removed and ``out`` is left as it was.
    See the module docstring for the rules on replacing an existing ``out``.
    """
    target = prepare_output(out, overwrite=overwrite, inputs=inputs, notify=notify)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json(tmp / PARTIAL_MARKER, _partial_marker())
        yield tmp
        mark_output(tmp, kind)
        (tmp / PARTIAL_MARKER).unlink()
        commit(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
