"""The one error type a user sees.

Every problem with user input (a file, a field, a shape) is raised as :class:`EdgeloraError` with a
one-line message that names what is wrong and how to fix it. The CLI prints it without a traceback
and exits with ``exit_code`` (2 for bad input, 1 for a check that failed on good input).
"""

from __future__ import annotations


class EdgeloraError(Exception):
    """Bad input or a failed check, explained in one line."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        # One line, always: the CLI prints it as-is.
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self)


class DeploymentError(EdgeloraError):
    """A deployment folder (or a file in it) that cannot be trusted or used: missing, corrupt, changed since
    export, outside the folder, or of the wrong type. The fix is almost always to re-export it."""


class DeltaError(DeploymentError):
    """A delta file that cannot be used with this deployment (corrupt, other base, wrong shapes or dtypes)."""


class InputError(EdgeloraError):
    """A call given inputs the engine cannot take (ids out of range, wrong shapes or dtypes)."""


class EdgeloraWarning(UserWarning):
    """A change edgelora made to what the user asked for, or a doubt it wants the user to see."""
