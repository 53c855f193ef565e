"""The one exception type the convert package raises for bad input."""

from __future__ import annotations

from sgtv_jax.errors import SgtvError


class ConvertError(SgtvError):
    """A checkpoint could not be read, validated or written.

    The message always names the offending file or tensor, so a user can act on
    it without a traceback.
    """
