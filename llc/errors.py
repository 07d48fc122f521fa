"""The one exception type the CLI turns into a one-line message and exit code 2.

Everything a user can get wrong (a bad file, a profile typo, a model that does
not fit) raises :class:`LlcError` with the file it concerns, so the CLI can
print ``llc: <file>: <problem>`` without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class LlcError(Exception):
    """A user-facing error: ``where`` names the file (and line), ``message`` the problem."""

    exit_code = 2

    def __init__(self, where: str | Path | None, message: str):
        self.where = str(where) if where is not None else None
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class DoesNotFit(LlcError):
    """The model needs more memory than the devices have (exit code 2, shortfall in MB)."""
