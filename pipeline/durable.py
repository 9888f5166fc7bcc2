"""Writes whose loss would lose results: whole or not at all, on disk before they count.

`write_atomically`, the one whole-file write (checkpoints, reports, manifests, imported PNGs,
exported heads), writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the folder, so a crash or power cut leaves the old file or the new one, and a
failure (a full disk above all) leaves no temporary file and says which file and what to do.
Folders published by one rename (the adapter) use `fsync_files` and `fsync_folder`; cache chunk
files keep their own `.partial` name, which the next writer cleans up.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from pipeline.errors import DiskFullError


def fsync_folder(folder: Path) -> None:
    """Make a rename into `folder` durable (POSIX: fsync the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(folder: Path) -> None:
    """fsync every file under `folder` (written by a library that does not, e.g. peft), so that
    a rename of `folder` that follows publishes data already on disk."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_atomically(path: Path, data: bytes, *, hint: str = "then run the same command again"
                     ) -> None:
    """Replace `path` by `data`, durably (see the module docstring). A full disk raises
    DiskFullError (an OSError, ENOSPC) naming `path`, then `hint` (what the user does next)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"No space left on device while writing {path} "
                                f"({len(data)} bytes); free space in {path.parent}, {hint}",
                                err.errno) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is a full disk (libraries such as torch
    and safetensors wrap the OSError in their own)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False
