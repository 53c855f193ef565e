"""Files named by a model directory must stay inside it.

A model directory names other files in two ways: fixed names we copy into an
output (tokenizer files, generation config, chat template) and shard names in
an index (``model.safetensors.index.json``). Either can point elsewhere: a
symlink to ``/etc/passwd`` or a private key, a shard named
``../other/model.safetensors``. Reading such a file would leak it into a
published output, so every such name is resolved and must land inside the
directory.

One exception: a Hugging Face cache snapshot
(``.../models--ORG--NAME/snapshots/<rev>/file -> ../../blobs/<hash>``) links
into its own repository folder's ``blobs/`` store; targets inside the enclosing
``models--*`` folder are allowed.

Every file any command reads from a model, tokenizer or adapter folder goes
through :func:`contained_file` (directly, or through :func:`read_contained_text`,
:func:`read_contained_json` or ``convert.local_tokenizer``);
``tests/cli/test_containment.py`` scans the sources for file reads that do not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from convert.errors import ConvertError

_HF_REPO_PREFIX = ("models--", "datasets--", "spaces--")


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


def allowed_roots(directory: str | Path) -> list[str]:
    """Real paths a file of ``directory`` may resolve into: the directory, and the
    enclosing ``models--*`` repository folder when it is a HF cache snapshot."""
    roots = [os.path.realpath(directory)]
    for form in (os.path.abspath(directory), roots[0]):
        parts = Path(form).parts
        for i in range(len(parts) - 2):
            # .../models--X/snapshots/<rev>[/...]
            if parts[i].startswith(_HF_REPO_PREFIX) and parts[i + 1] == "snapshots":
                roots.append(os.path.realpath(Path(*parts[: i + 1])))
                break
    return list(dict.fromkeys(roots))


def contained_file(directory: str | Path, name: str, *, what: str) -> Path:
    """The real path of file ``name`` of ``directory``; refuses one that leaves it.

    ``name`` is relative (as written in an index, or a fixed file name);
    ``what`` says where the name came from, for the message. Raises
    ConvertError naming the file and where it points when the name is absolute,
    or it (or a symlink on the way) resolves outside the allowed roots.
    """
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise ConvertError(f"{what}: {name!r} is not a file name relative to {directory}; refusing to read it")
    path = Path(directory) / name
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in allowed_roots(directory)):
        raise ConvertError(
            f"{what}: {path} resolves to {real}, outside the model directory {directory}; "
            "refusing to read it (copy the file into the directory if it belongs to the model)"
        )
    return Path(real)


def read_contained_text(directory: str | Path, name: str, *, what: str) -> str:
    """The UTF-8 text of file ``name`` of ``directory``, read through :func:`contained_file`.

    ConvertError naming the file when it leaves the directory or is not UTF-8.
    """
    real = contained_file(directory, name, what=what)
    try:
        return real.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(f"{Path(directory) / name}: not UTF-8 text (byte offset {e.start})") from None
    except OSError as e:
        raise ConvertError(f"{Path(directory) / name}: cannot be read ({e.strerror or e})") from None


def read_contained_json(directory: str | Path, name: str, *, what: str) -> Any:
    """The parsed JSON of file ``name`` of ``directory``, read through :func:`contained_file`.

    ConvertError naming the file when it leaves the directory or is not JSON.
    """
    text = read_contained_text(directory, name, what=what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        raise ConvertError(f"{Path(directory) / name}: not valid JSON ({e})") from None


def contained_tree(directory: str | Path, name: str, *, what: str) -> Path:
    """`contained_file` for a folder ``name`` of ``directory`` and everything under it.

    For readers that open a whole tree themselves (Orbax's ``state/``): the
    folder, each subfolder and each file must resolve inside ``directory``.
    """
    top = contained_file(directory, name, what=what)
    for here, dirs, files in os.walk(Path(directory) / name):
        for entry in dirs + files:
            rel = os.path.relpath(os.path.join(here, entry), directory)
            contained_file(directory, rel, what=f"{what} ({rel})")
    return top
