"""The errors a user can meet and act on, and the one policy every command applies to them.

Every user-facing error subclasses `UserError` (most also keep a builtin base, `ValueError` or
`RuntimeError`, so library callers that catch those still do). Its message names the file, row,
cache or key concerned and says what to do. `run_command` is the policy of every CLI: a
`UserError` prints `error: <message>` and exits 1 (a `UsageError` exits 2, as argparse does);
Ctrl-C prints one `interrupted:` line saying how to resume and exits 130; SIGTERM (what Slurm,
`scancel` and `timeout` send first) is handled the same way (`interrupted by SIGTERM:`, exit
143); anything else is a bug and keeps its traceback. The bottom layer: imports nothing of
`pipeline`.
"""

from __future__ import annotations

import difflib
import errno
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


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


class MissingPathError(UserError, FileNotFoundError):
    """A path given on the command line that does not exist, or is not the kind asked for."""

    def __str__(self) -> str:
        return str(self.args[0])


def check_path(path: str | Path, *, flag: str, kind: str = "file", what: str | None = None,
               needs: str = "") -> Path:
    """`path` when it is an existing `kind` ("file" or "folder"), else `MissingPathError` naming
    `flag`, `what` the path should be, the folder it was looked for in and the closest names
    there (a typo's likely intent). `needs`: what the flag takes, appended to the message."""
    path = Path(path).expanduser()
    found = path.is_file() if kind == "file" else path.is_dir()
    if found:
        return path
    what = what or kind
    if path.exists():
        other = "folder" if path.is_dir() else "file"
        problem = f"is a {other}, not a {what}"
    else:
        where = "" if path.is_absolute() else f" (looked for in {Path.cwd()})"
        problem = f"{what} not found{where}{_closest(path, kind)}"
    raise MissingPathError(f"{flag} {path}: {problem}{f'; {needs}' if needs else ''}")


def _closest(path: Path, kind: str) -> str:
    """", did you mean X?" for the names beside `path` closest to its name, else ""."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        names = [p.name for p in folder.iterdir() if (p.is_file() if kind == "file"
                                                       else p.is_dir())]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=2, cutoff=0.6)
    return f", did you mean {' or '.join(str(folder / n) for n in close)}?" if close else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C raises KeyboardInterrupt: the same
    clean-up runs for both (a training writes its report; see `deferred_interrupts`)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def terminate_like_interrupt(*, force: bool = False) -> Callable | int | None:
    """From now on SIGTERM raises `Terminated` in the main thread; returns the old handler
    (None outside the main thread, where handlers cannot be set).

    A SIGTERM ignored by whoever started us (as `nohup` ignores SIGHUP) stays ignored, unless
    `force`: a worker process whose parent stops it with SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and not force:
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


_pending: list[int] | None = None  # signals that arrived inside `deferred_interrupts`


def _remember(signum, frame):
    _pending.append(signum)


@contextmanager
def deferred_interrupts():
    """Ctrl-C and SIGTERM wait until the block ends, then are raised (`Terminated` for
    SIGTERM): what the block writes (a checkpoint and its adapter) is written whole.

    A signal the process ignores stays ignored, inside the block as outside: a shell starts
    a background job (`cmd &` in a script) with SIGINT ignored, and such a job goes on."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or _pending is not None:
        yield  # another thread cannot set handlers; an outer block already defers
        return
    _pending = []
    previous = {s: signal.signal(s, _remember) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        arrived, _pending = _pending, None
        if signal.SIGTERM in arrived:
            raise Terminated()
        if arrived:
            raise KeyboardInterrupt()


class Notice(UserWarning):
    """A warning for the user about their input: shown by the commands as one `warning: ...`
    line, without Python's source file and code line."""


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    """A `Notice` as one `warning: ...` line; other warnings as Python shows them."""
    if issubclass(category, Notice):
        return f"warning: {message}\n"
    return _DEFAULT_FORMAT(message, category, filename, lineno, line)


_DEFAULT_FORMAT = warnings.formatwarning


def run_command(main: Callable[[], int], *, resume: str | Callable[[], str]) -> int:
    """Run `main()` under the error policy (module docstring); its exit status.

    `resume` is the `interrupted:` line's advice (or a function that returns it, asked only
    after Ctrl-C or SIGTERM, when it may know more: the run directory, say)."""
    previous = terminate_like_interrupt()
    formatter = warnings.formatwarning
    warnings.formatwarning = _plain_warning
    try:
        return main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt as stop:
        advice = resume() if callable(resume) else resume
        by = " by SIGTERM" if isinstance(stop, Terminated) else ""
        print(f"\ninterrupted{by}: {advice}", file=sys.stderr, flush=True)
        return 143 if by else 130
    finally:
        warnings.formatwarning = formatter
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
