"""Errors that edgec reports to users as one line, without a traceback.

Library code raises :class:`EdgecError` (or a subclass) for anything that is the user's
mistake or an environment problem the user can fix: a missing file, a bad shape, an unknown
pass.  The CLI prints ``error: <message>`` followed by ``hint: <hint>`` and exits non-zero.
Bugs in edgec itself are any other exception and keep their traceback.
"""

from __future__ import annotations


class EdgecError(Exception):
    """A user-facing error: ``message`` says what is wrong, ``hint`` what to do about it."""

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message

    @classmethod
    def wrapping(cls, what: str, exc: BaseException, hint: str | None = None) -> EdgecError:
        """``what``, then :func:`exception_summary` of ``exc``."""
        return cls(f"{what}: {exception_summary(exc)}", hint)


def exception_summary(exc: BaseException) -> str:
    """The exception's type and the last non-blank line of its text (TVM's errors carry a C++
    backtrace before the line that says what went wrong)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


class InputError(EdgecError):
    """Bad input given by the user: a missing or malformed file, a wrong shape or name."""


class ModelLoadError(InputError):
    """A model could not be loaded or built (not ONNX, too large, a factory that raised)."""


class UnknownNameError(InputError):
    """A name (pass, model, target) that is not registered."""


class EquivalenceError(EdgecError):
    """A transformed model's outputs differ from the reference beyond the tolerance."""

    exit_code = 3


class ToolMissingError(EdgecError):
    """An external tool (cross compiler, qemu) is missing; the hint names the package."""
