"""Checkpoints: sharded directories written in the background and read per rank, and the single files of
earlier versions and of shared generators. The modules, bottom up: errors (causes in words), codec (a state as
named tensors and a JSON skeleton), dcp_io (directories through torch.distributed.checkpoint, read safely), files
(names, listing, retention, single files), load (either format into one dict), writer (the background writer)."""

from pipeline.engine.checkpoint.errors import CheckpointError, CheckpointWriteError
from pipeline.engine.checkpoint.files import (
    checkpoint_path,
    incomplete_checkpoints,
    is_checkpoint_directory,
    list_checkpoints,
    prune,
    save_atomic,
    size_on_disk,
    state_bytes,
)
from pipeline.engine.checkpoint.load import (
    BEST_NAME,
    FORMAT,
    SHARDED_FORMAT,
    find_latest_loadable,
    load_checkpoint,
    read_best,
    read_header,
)
from pipeline.engine.checkpoint.writer import Checkpointer, Outcome

__all__ = [
    "BEST_NAME", "FORMAT", "SHARDED_FORMAT", "CheckpointError", "CheckpointWriteError", "Checkpointer", "Outcome",
    "checkpoint_path", "find_latest_loadable", "incomplete_checkpoints", "is_checkpoint_directory",
    "list_checkpoints", "load_checkpoint", "prune", "read_best", "read_header", "save_atomic", "size_on_disk",
    "state_bytes",
]
