"""What goes wrong with checkpoints, in words a person at a terminal acts on."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or used for this run, and why."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that was not written (no partial or temporary file is left; earlier files are untouched)."""


_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the filesystem is read-only",
    errno.EIO: "an I/O error (a failing disk or a lost network filesystem)",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
}


def free_bytes(directory: Path) -> int | None:
    """Free bytes on the filesystem of `directory` (or of its nearest existing parent), None if unknown."""
    directory = Path(directory)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def mib(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def root_cause(err: BaseException) -> BaseException:
    """The OSError behind a wrapped failure (torch's zip writer, DCP's CheckpointException), else `err`."""
    seen: set[int] = set()
    stack: list[BaseException] = [err]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        # DCP's CheckpointException holds each failed rank's (exception, traceback) in `failures`.
        for wrapped in getattr(current, "failures", {}).values():
            inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
            if isinstance(inner, BaseException):
                stack.append(inner)
        for inner in (current.__cause__, current.__context__):
            if inner is not None:
                stack.append(inner)
    return err


def describe_cause(err: BaseException, directory: Path) -> str:
    """The reason of a failed write, in words, with the free space where that matters."""
    err = root_cause(err)
    if isinstance(err, OSError) and err.errno in _CAUSES:
        words = f"{_CAUSES[err.errno]} ({err.strerror})"
    elif isinstance(err, OSError):
        words = f"{err.strerror or err}"
    else:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        words = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(directory)
        if free is not None:
            words += f"; {mib(free)} free"
    return words
