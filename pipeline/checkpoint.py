"""Checkpoint files: atomic writes, retention, finding the newest loadable one, and safe loading.

A checkpoint is a plain dict of tensors, numbers and strings (the training state assembled in
`pipeline/train_state.py`), loaded with `torch.load(weights_only=True)` so that a file cannot run code. Files are
named by step (`ckpt-000001000.pt`), written to a temporary file that is fsynced and renamed into place, so a
crash mid-write leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import logging
import os
import re
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


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` through a fsynced temporary file and a rename; never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # Makes the rename itself durable.
    finally:
        os.close(dir_fd)


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


def find_latest_loadable(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that loads, skipping (with a warning) newer broken ones."""
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

    def __init__(self, directory: Path, keep_last: int, keep_every_steps: int = 0) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_every_steps = keep_every_steps

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write the checkpoint of `step`; raises CheckpointError (earlier files untouched) if it fails."""
        path = checkpoint_path(self.directory, step)
        try:
            save_atomic(state, path)
        except OSError as err:
            raise CheckpointError(
                f"could not write checkpoint '{path}': {err.strerror or err}. The previous checkpoint is "
                "intact; free space or fix permissions in the run directory"
            ) from err
        prune(self.directory, self.keep_last, self.keep_every_steps)
        return path
