"""The one exception type for mistakes a user can fix, and how every command reports them: one ``error:`` line per
problem on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
    """Bad config, missing data or impossible sizes: the message names the key and the fix."""


class RunInterrupted(Exception):
    """A signal stopped training after a checkpoint was saved; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)


def fail(problems: list[str]) -> None:
    """Print each problem as one ``error:`` line on stderr and exit with code 2."""
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A command's body: a :class:`UserError`, also one a constructor raised under Hydra's ``instantiate`` (its cause),
    ends the command with :func:`fail`'s lines; anything else is a bug and keeps its traceback."""
    try:
        yield
    except UserError as e:
        fail(str(e).splitlines())
    except Exception as e:
        if not isinstance(e.__cause__, UserError):
            raise
        fail(str(e.__cause__).splitlines())
