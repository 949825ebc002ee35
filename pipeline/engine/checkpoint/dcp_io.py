"""Checkpoint directories through torch.distributed.checkpoint (DCP): written by every rank, read per entry.

A directory holds one `__<rank>_0.distcp` file per rank that had something to write and DCP's `.metadata`, which
the coordinator writes last, through a rename: a directory without it is incomplete. Every entry is a tensor
(`codec.py`). DCP's metadata is a pickle that DCP's own reader opens with `pickle.load`; here an unpickler that
admits DCP's metadata classes and nothing else reads it, so a crafted file cannot run code. DCP reads the tensor
records with `torch.load(weights_only=True)`, and a pickled-object entry is refused before it is read.
"""

from __future__ import annotations

import io
import os
import pickle
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from pipeline.engine.checkpoint.errors import CheckpointError, root_cause

METADATA = ".metadata"
WRITE_DELAY_ENV = "PIPELINE_CHECKPOINT_FINISH_DELAY_S"
"""Seconds to hold a checkpoint between its data files and its metadata (for tests of a write in flight: a kill
then leaves exactly what a crash mid-write leaves). Unset in normal use."""

# DCP warns on every single-process save and load; that is how this project uses it outside a process group.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # Returns a torch.layout by name.
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def is_complete(directory: Path) -> bool:
    return (Path(directory) / METADATA).is_file()


def read_metadata(directory: Path) -> Metadata:
    """DCP's metadata of a checkpoint directory, read without running code.

    Raises:
        CheckpointError: no metadata (an incomplete checkpoint), or one that is corrupt or holds other objects.
    """
    path = Path(directory) / METADATA
    try:
        with path.open("rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{directory}' is incomplete: it has no {METADATA} (its write was "
                              "cut off)") from None
    except Exception as err:  # noqa: BLE001 - UnpicklingError, EOFError, AttributeError, ...
        raise CheckpointError(f"checkpoint '{directory}' cannot be loaded safely ({METADATA}: "
                              f"{type(err).__name__}: {err}); it is corrupt or holds objects other than "
                              "checkpoint metadata") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint '{directory}': {METADATA} is not DCP metadata")
    return metadata


def verify(directory: Path, metadata: Metadata) -> None:
    """Every data file the metadata names exists and holds its records (a truncated copy is caught here).

    Raises:
        CheckpointError: naming the first missing or short file.
    """
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = Path(directory) / name
        size = path.stat().st_size if path.is_file() else None
        if size is None or size < end:
            what = "is missing" if size is None else f"is truncated ({size:,} of {end:,} bytes)"
            raise CheckpointError(f"checkpoint '{directory}': data file {name} {what}")


class _SafeReader(FileSystemReader):
    """DCP's reader, handed the metadata its caller already read safely (DCP would read the file again)."""

    def __init__(self, directory: Path, metadata: Metadata) -> None:
        super().__init__(directory)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint entry '{read_item.dest_index.fqn}' is a pickled object, which this "
                              "project never writes; refusing to load it")


def read_entries(directory: Path, keys: Iterable[str], metadata: Metadata | None = None) -> dict[str, torch.Tensor]:
    """The named tensor entries of a checkpoint directory, on the CPU; nothing else is read.

    Raises:
        CheckpointError: a key that is missing or not a tensor, or data that cannot be read.
    """
    directory = Path(directory)
    metadata = metadata if metadata is not None else read_metadata(directory)
    targets = {}
    for key in keys:
        entry = metadata.state_dict_metadata.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            what = "missing" if entry is None else "not a tensor"
            raise CheckpointError(f"checkpoint '{directory}': entry '{key}' is {what}")
        targets[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
    if not targets:
        return targets
    try:
        dcp.load(targets, storage_reader=_SafeReader(directory, metadata), planner=_TensorsOnlyPlanner(), no_dist=True)
    except CheckpointError:
        raise
    except BaseException as err:  # noqa: BLE001 - DCP wraps failures in CheckpointException (a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        cause = root_cause(err)
        first = str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else type(cause).__name__
        raise CheckpointError(f"checkpoint '{directory}' cannot be loaded safely ({type(cause).__name__}: "
                              f"{first}); it is truncated, corrupt, or holds objects other than tensors") from None
    return targets


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writer(FileSystemWriter):
    """DCP's file writer; the directory entry of the renamed metadata is made durable too."""

    durable = False
    """The coordinator's metadata is renamed into place and fsynced: the checkpoint is complete on disk."""

    def finish(self, metadata: Metadata, results: Any) -> None:
        delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
        if delay > 0:
            time.sleep(delay)
        super().finish(metadata, results)
        fsync_directory(Path(self.path))
        self.durable = True


def write_entries(directory: Path, entries: dict[str, torch.Tensor], process_group: Any = None) -> None:
    """Write every rank's `entries` into `directory` (a collective over `process_group` when distributed).

    Entries of the same key on several ranks must be equal: DCP writes each once, spread over the ranks.
    Raises what DCP raises (CheckpointException, a BaseException, holding each failed rank's error), with
    `durable` set on it when this rank, the coordinator, had already made the complete checkpoint durable.
    """
    writer = _Writer(Path(directory), sync_files=True)
    try:
        dcp.save(entries, storage_writer=writer, process_group=process_group, no_dist=process_group is None)
    except BaseException as err:
        err.durable = writer.durable  # type: ignore[attr-defined]
        raise
