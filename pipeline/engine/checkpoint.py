"""Checkpoint files: atomic writes, retention, finding the newest loadable one, and safe loading.

A checkpoint is a plain dict of tensors, numbers and strings (the training state assembled in
`pipeline/train/state.py`), loaded with `torch.load(weights_only=True)` so that a file cannot run code. Files are
named by step (`ckpt-000001000.pt`), written to a temporary file that is fsynced and renamed into place, so a
crash mid-write leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = "cyclegan-pipeline/1"
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or used for this run, and why."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:09d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `directory`, oldest first; temporary files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


class CheckpointWriteError(CheckpointError):
    """A checkpoint that was not written (no partial or temporary file is left; earlier files are untouched)."""


# Causes of a failed write, in words a person at a terminal acts on.
_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the filesystem is read-only",
    errno.EIO: "an I/O error (a failing disk or a lost network filesystem)",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
}


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def _cause(err: BaseException, directory: Path) -> str:
    """The reason of a failed write, in words, with the free space where that matters."""
    if isinstance(err, OSError) and err.errno in _CAUSES:
        words = f"{_CAUSES[err.errno]} ({err.strerror})"
    elif isinstance(err, OSError):
        words = f"{err.strerror or err}"
    else:
        reason = str(err).splitlines()[0] if str(err) else ""
        words = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(directory)
        if free is not None:
            words += f"; {_mb(free)} free"
    return words


class _CountingWriter:
    """A file object for torch.save that counts bytes and keeps the OSError of a failed write.

    torch's zip writer turns a failed write into `RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos`, which says neither that the disk is full nor how much was written; this keeps both.
    """

    def __init__(self, handle: Any) -> None:
        self.handle, self.written, self.error = handle, 0, None

    def write(self, data: bytes) -> int:
        try:
            n = self.handle.write(data)
        except OSError as err:
            self.error = err
            raise
        self.written += len(data)
        return n

    def flush(self) -> None:
        self.handle.flush()


def save_atomic(obj: Any, path: Path) -> int:
    """torch.save `obj` to `path` through a fsynced temporary file and a rename; returns the file's size.

    Raises:
        CheckpointWriteError: the write failed for any reason (disk full, quota, permission, I/O error, ...);
            the message names the path, the cause in words and the bytes written. No partial file is left.
    """
    path = Path(path)
    tmp: str | None = None
    writer: _CountingWriter | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            writer = _CountingWriter(handle)
            torch.save(obj, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # Makes the rename itself durable.
        finally:
            os.close(dir_fd)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError for a failed write, the OS OSError
        cause = writer.error if writer is not None and writer.error is not None else err
        written = f" after {writer.written:,} bytes" if writer is not None and writer.written else ""
        raise CheckpointWriteError(
            f"could not write checkpoint '{path}'{written}: {_cause(cause, path.parent)}"
        ) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path.stat().st_size


def state_bytes(state: Any) -> int:
    """A lower bound of the size of `state` as a torch.save file: the bytes of its tensors' storages."""
    if isinstance(state, torch.Tensor):
        return state.untyped_storage().nbytes()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by this project, refusing anything that is not plain data."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' does not exist") from None
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint '{path}' cannot be loaded safely ({type(err).__name__}: {reason}); it is truncated, "
            "corrupt, or holds objects other than tensors and plain data"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not a training checkpoint of this project (format {FORMAT}); to start from "
            "reference-implementation weights use `pipeline.interop`"
        )
    return state


BEST_NAME = "best.pt"


def read_best(directory: Path) -> dict[str, Any] | None:
    """The `best` record (metric, mode, value, step) of `directory/best.pt`, or None (absent or unreadable)."""
    path = Path(directory) / BEST_NAME
    if not path.exists():
        return None
    try:
        return load_checkpoint(path).get("best")
    except CheckpointError as err:
        log.warning("ignoring %s: %s", path, err)
        return None


def find_latest_loadable(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest step checkpoint in `directory` that loads, skipping (with a warning) newer broken ones
    (best.pt is not a step checkpoint: it is never resumed from)."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping checkpoint of step %d: %s", step, err)
    return None


def prune(directory: Path, keep_last: int, keep_every_steps: int = 0) -> list[Path]:
    """Delete checkpoints other than the newest `keep_last` and those at multiples of `keep_every_steps`."""
    found = list_checkpoints(directory)
    keep = {path for _, path in found[-max(1, keep_last):]}
    if keep_every_steps > 0:
        keep |= {path for step, path in found if step % keep_every_steps == 0}
    removed = [path for _, path in found if path not in keep]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


class CheckpointWriter:
    """Writes checkpoints of one run directory and applies the retention policy (rank 0 only)."""

    def __init__(self, directory: Path, keep_last: int, keep_every_steps: int = 0, min_free_mb: float = 0.0) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_every_steps = keep_every_steps
        self.min_free = int(min_free_mb * 2**20)
        found = list_checkpoints(self.directory)
        self.last_size: int | None = found[-1][1].stat().st_size if found else None
        """Size of the last file written (or found, when resuming): the size of the next one, since a run's state
        keeps its shapes."""

    def newest(self) -> str:
        """The newest checkpoint on disk, in words, for messages about a failed write."""
        found = list_checkpoints(self.directory)
        return f"{found[-1][1].name} (step {found[-1][0]})" if found else "none: no checkpoint was written yet"

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write the checkpoint of `step`, then prune old ones.

        Raises:
            CheckpointWriteError: not written (earlier files untouched): the filesystem has less room than the
                checkpoint needs plus `min_free_mb` (checked before writing), or the write failed.
        """
        path = checkpoint_path(self.directory, step)
        self.directory.mkdir(parents=True, exist_ok=True)
        known = self.last_size is not None
        needed = self.last_size if known else state_bytes(state)
        free = _free_bytes(self.directory)
        if free is not None and free - needed < self.min_free:
            what = "the size of the last one" if known else "its tensors alone"
            raise CheckpointWriteError(
                f"checkpoint '{path}' not written: it needs {_mb(needed)} ({what}) and the filesystem has "
                f"{_mb(free)} free, which would leave less than checkpoint.min_free_mb="
                f"{self.min_free / 2**20:g} MiB: the disk is (nearly) full. Newest checkpoint: {self.newest()}"
            )
        try:
            self.last_size = save_atomic(state, path)
        except CheckpointWriteError as err:
            raise CheckpointWriteError(f"{err}. Newest checkpoint: {self.newest()}") from err
        prune(self.directory, self.keep_last, self.keep_every_steps)
        return path
