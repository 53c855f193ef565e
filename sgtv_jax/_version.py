"""The package's version, from its one source: pyproject.toml's ``version``, read back from the installed metadata.

Nothing else states the number: ``sgtv --version``, ``sgtv_jax.__version__`` and
the output marker (``convert.atomic``) all call :func:`version`. A source tree
that was never installed has no metadata; it says so instead of guessing.
"""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "sgtv-jax"  # the [project] name in pyproject.toml
NOT_INSTALLED = "unknown (not installed)"


def version() -> str:
    """The installed distribution's version, or ``NOT_INSTALLED`` (running from a source tree)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED
