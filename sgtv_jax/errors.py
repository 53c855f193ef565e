"""The one exception hierarchy for bad input: the `sgtv` CLI prints these as `error: ...` (exit 2).

Every message names what is wrong (file, model, tensor, key), so a user can
act on it without a traceback. Anything else that escapes a subcommand is a
bug and keeps its traceback.
"""

from __future__ import annotations

import reprlib


class SgtvError(ValueError):
    """Base class: bad input (config, checkpoint, calibration data, numerics of user data)."""


class NumericsError(SgtvError):
    """User data that the numerics cannot use: NaN/Inf in a model, a Hessian indefinite after damping."""


class ResourceError(SgtvError):
    """The job would not fit (memory estimate above what the machine has); names the knob to turn."""


_short = reprlib.Repr()
_short.maxlevel = 3
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6
_short.maxstring = _short.maxother = 80


def short_repr(value: object) -> str:
    """`repr` bounded in depth and length (user values can be huge or deeply shared)."""
    return _short.repr(value)
