"""The single writer of a cache: an flock on `<cache-id>.lock`, and the errors of caches.

One writer run holds the lock (released by the kernel if the run dies). The lock file names its
holder, so a refused run says who holds it, and a taker can tell whether its predecessor was
killed (and so may have left partial chunk files). Readers (trainings) hold a shared flock on
`<cache-id>.readers` while they run (`hold_for_reading`), so `cache rm` refuses a cache in use
(`removal_lock`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError


class CacheError(UserError, RuntimeError):
    """A cache that is missing, locked, stale or damaged; the message says what to do."""


class CacheLockedError(CacheError):
    pass


RELEASED = "released"


def remove_partial_writes(path: Path) -> None:
    """Delete the `<chunk>.<uuid>.partial` files a killed writer left in the cache at `path`.
    Chunks are written to such a file and renamed into place (by zarr and by `ChunkFiles.write`),
    so they are never read; they only hold disk (up to 42 MB each at sam3's 4x level). Safe under
    `writer_lock` only."""
    for leftover in Path(path).rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def _report_waiting(handle, path: Path, every: float = 60.0):
    """While the caller blocks on the lock: say whom it waits for, then again every `every` s."""
    import threading

    handle.seek(0)
    holder = handle.read().strip() or "another process"
    print(f"waiting for cache {path.name}: it is being written by {holder} (--wait); "
          "Ctrl-C stops waiting", file=sys.stderr, flush=True)
    stop, start = threading.Event(), time.monotonic()

    def remind():
        while not stop.wait(every):
            print(f"still waiting for cache {path.name} ({time.monotonic() - start:.0f} s)",
                  file=sys.stderr, flush=True)

    threading.Thread(target=remind, daemon=True).start()
    return stop


@contextmanager
def writer_lock(path: Path, *, wait: bool = False):
    """Hold the single-writer lock of the cache at `path` (an flock on `<path>.lock` sibling).

    The lock file names its holder; a holder that ends (even by an exception) appends
    "released". A lock taken over from a holder that never did (it was killed) first removes
    the partial chunk files that holder may have left (`remove_partial_writes`): only then,
    because that walk visits every chunk of the cache."""
    lock_path = path.with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle, held = open(lock_path, "a+"), False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                raise CacheLockedError(
                    f"cache {path.name} is being written by {holder}; wait for that run to "
                    "finish (or pass --wait to `sam3-vessel extract` to queue behind it)"
                ) from None
            stop = _report_waiting(handle, path)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            finally:
                stop.set()
        held = True
        handle.seek(0)
        previous = handle.read().strip()
        if previous and not previous.endswith(RELEASED):
            remove_partial_writes(path)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}")
        handle.flush()
        yield
    finally:
        if held:
            handle.write(f"; {RELEASED}")
            handle.flush()
        handle.close()  # closing releases the flock


def hold_for_reading(path: Path):
    """Mark the cache at `path` in use until this process ends: a shared flock on
    `<cache-id>.readers` (the returned handle; keep it). None where the folder is read-only:
    nobody can remove the cache there either."""
    try:
        handle = open(path.with_suffix(".readers"), "a+")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CacheError(f"cache {path.name} is being removed (`sam3-vessel cache rm`); "
                         "extract it again") from None
    return handle


@contextmanager
def removal_lock(path: Path):
    """Hold the cache at `path` for removal: refused (`CacheInUseError`) while a training
    reads it (`hold_for_reading`) or an extraction writes it (`writer_lock`)."""
    readers = path.with_suffix(".readers")
    with open(readers, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheInUseError(
                f"cache {path.name} is in use: a running `sam3-vessel train` reads it (it holds "
                f"{readers.name}); let it finish or stop it, then run `cache rm` again") from None
        with writer_lock(path):
            yield
        readers.unlink(missing_ok=True)


class CacheInUseError(CacheError):
    """A cache that a running training reads cannot be removed."""
