"""llc's errors, and the one place that turns any of them into a line and an exit code.

    LlcError        the user's input is wrong (a file, an option, a build): exit 2
      DoesNotFit    the model needs more memory than the devices have
      DeviceError   a device failed, hung or could not be reached: exit 1
      LabError      the phone lab could not be set up or torn down: exit 1

Everything else that escapes a command is a bug in llc: exit 1, one line that
says where and what to report (``internal_error``); LLC_DEBUG=1 shows the
traceback instead. Ctrl-C is exit 130.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

REPORT = ("this is a bug in llc, not in your input: please report it with the command you ran, "
          "`llc --version` and the traceback that LLC_DEBUG=1 prints")


class LlcError(Exception):
    """``where`` names the file (and line) when there is one, ``message`` the problem."""

    exit_code = 2

    def __init__(self, where: str | Path | None, message: str):
        self.where = str(where) if where is not None else None
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class DoesNotFit(LlcError):
    """The model needs more memory than the devices have (the message gives the shortfall in MB)."""


class DeviceError(LlcError):
    """A device died, hung, reported an error, or could not be started or reached."""

    exit_code = 1

    def __init__(self, device: str, reason: str):
        self.device = device
        self.reason = reason
        super().__init__(None, f"device {device!r}: {reason}")


class LabError(LlcError):
    """A step of the phone lab failed; the message says which and what to do."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(None, message)


def internal_error(e: BaseException) -> str:
    """One line for a bug: where it happened (the pass, for the compiler) and what to report."""
    from llc.compiler.pipeline import PassError

    if isinstance(e, PassError):
        cause = e.__cause__
        return (f"in pass {e.pass_name} (after {', '.join(e.done) or 'none'}): "
                f"{type(cause).__name__}: {cause}; {REPORT}")
    return f"{type(e).__name__}: {e}; {REPORT}"


def one_line_errors(fn):
    """Every command's errors as one line on stderr and an exit code (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.UsageError:  # a bad option value found in the command's body: click's usage error, exit 2
            raise
        except LlcError as e:
            print(f"llc: {'error: ' if e.exit_code == 2 else ''}{e}", file=sys.stderr, flush=True)
            for line in getattr(e, "details", ()):
                print(f"  {line}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("llc: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as e:  # a bug
            if os.environ.get("LLC_DEBUG"):
                raise
            print(f"llc: internal error: {internal_error(e)}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper
