"""Checkpoint names, listing and retention, and the single-file format (torch.save, loaded safely).

A run's checkpoints are named by step: `ckpt-000001000/` (a sharded directory, `dcp_io.py`) or, from runs of
earlier versions and for shared generator files, `ckpt-000001000.pt` (one `torch.save` file, written through a
fsynced temporary file and a rename, loaded with `weights_only=True` so that it cannot run code).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.engine.checkpoint.dcp_io import fsync_directory, is_complete
from pipeline.engine.checkpoint.errors import CheckpointError, CheckpointWriteError, describe_cause

_NAME = re.compile(r"^ckpt-(\d{9})(\.pt)?$")


def checkpoint_path(directory: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written: a directory."""
    return Path(directory) / f"ckpt-{step:09d}"


def is_checkpoint_directory(path: Path) -> bool:
    """A folder that is one of our checkpoints (complete or not), not a reference folder of weight files."""
    path = Path(path)
    return path.is_dir() and (is_complete(path) or bool(_NAME.match(path.name)))


def _found(directory: Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)))


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in `directory`, oldest first: directories with their metadata
    and single files; incomplete directories and temporary files are left out."""
    return [(step, path) for step, path in _found(directory) if path.is_file() or is_complete(path)]


def incomplete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories whose write never finished (no metadata), and temporary files of cut-off writes
    (single files and best.pt)."""
    directory = Path(directory)
    partial = [path for _, path in _found(directory) if path.is_dir() and not is_complete(path)]
    if directory.is_dir():
        partial += [p for p in directory.iterdir()
                    if p.name.startswith((".ckpt-", ".best.pt.")) and p.name.endswith(".tmp")]
    return sorted(partial)


def remove(path: Path) -> None:
    """Delete a checkpoint, directory or file; a directory loses its metadata first, so that a deletion cut
    short leaves an incomplete checkpoint (ignored, cleaned up later), never a complete-looking partial one."""
    path = Path(path)
    if path.is_dir():
        (path / ".metadata").unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune(directory: Path, keep_last: int, keep_every_steps: int = 0) -> list[Path]:
    """Delete checkpoints other than the newest `keep_last` and those at multiples of `keep_every_steps`."""
    found = list_checkpoints(directory)
    keep = {path for _, path in found[-max(1, keep_last):]}
    if keep_every_steps > 0:
        keep |= {path for step, path in found if step % keep_every_steps == 0}
    removed = [path for _, path in found if path not in keep]
    for path in removed:
        remove(path)
    return removed


def size_on_disk(path: Path) -> int:
    """Bytes of a checkpoint file, or of every file of a checkpoint directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0


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
        fsync_directory(path.parent)  # Makes the rename itself durable.
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError for a failed write, the OS OSError
        cause = writer.error if writer is not None and writer.error is not None else err
        written = f" after {writer.written:,} bytes" if writer is not None and writer.written else ""
        raise CheckpointWriteError(
            f"could not write checkpoint '{path}'{written}: {describe_cause(cause, path.parent)}"
        ) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path.stat().st_size


def state_bytes(state: Any) -> int:
    """A lower bound of the size of `state` on disk: the bytes of its tensors."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def load_file(path: Path) -> Any:
    """torch.load a single checkpoint file, refusing anything that is not plain data."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' does not exist") from None
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint '{path}' cannot be loaded safely ({type(err).__name__}: {reason}); it is truncated, "
            "corrupt, or holds objects other than tensors and plain data"
        ) from None
