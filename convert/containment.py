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
"""

from __future__ import annotations

import os
from pathlib import Path

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
