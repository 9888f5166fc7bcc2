"""The errors a user can meet and act on, and the one policy every command applies to them.

Every user-facing error subclasses `UserError` (most also keep a builtin base, `ValueError` or
`RuntimeError`, so library callers that catch those still do). Its message names the file, row,
cache or key concerned and says what to do. `run_command` is the policy of every CLI: a
`UserError` prints `error: <message>` and exits 1 (a `UsageError` exits 2, as argparse does);
Ctrl-C prints one `interrupted:` line saying how to resume and exits 130; anything else is a bug
and keeps its traceback. The bottom layer: imports nothing of `pipeline`.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can act on: commands print its message, not a traceback."""


class UsageError(UserError, ValueError):
    """Flags or arguments that contradict each other: exit status 2, as argparse's own."""


class DiskFullError(UserError, OSError):
    """No space left while writing a file whose loss would lose results (errno ENOSPC)."""

    def __init__(self, message: str, code: int = errno.ENOSPC):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


def run_command(main: Callable[[], int], *, resume: str | Callable[[], str]) -> int:
    """Run `main()` under the error policy (module docstring); its exit status.

    `resume` is the `interrupted:` line's advice (or a function that returns it, asked only
    after Ctrl-C, when it may know more: the run directory, say)."""
    try:
        return main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        advice = resume() if callable(resume) else resume
        print(f"\ninterrupted: {advice}", file=sys.stderr, flush=True)
        return 130
