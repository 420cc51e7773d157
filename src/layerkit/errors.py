"""The one exception type users see: a single clear sentence, no traceback needed."""

from __future__ import annotations


class LayerkitError(Exception):
    """A problem with the user's input or environment, stated in one sentence.

    The CLI prints ``str(error)`` alone (no traceback) and exits with status 2.
    """


class ShapeError(LayerkitError, ValueError):
    """A tensor or array whose shape is not the one expected."""


def expect_shape(name: str, tensor, expected: str, ok: bool) -> None:
    """Raise ``ShapeError`` naming ``name``, its actual shape and the expected layout."""
    if not ok:
        shape = tuple(getattr(tensor, "shape", ()))
        raise ShapeError(f"{name} has shape {shape}, expected {expected}.")
