"""Reading checkpoints of either format: a sharded directory, read per entry, or an earlier run's single file.

Both read into the same dict: the header (format, step, counters, config, model settings, MLflow run id), the
replicated state (`nets`, `opt_g`, `opt_d`, `scaler`, `ema`) and `ranks`, one entry per rank of the run that wrote
it. Ranks that were not asked for are None, and a rank reads only what it asks for: a resuming rank reads the
replicated state and its own entry, a command that translates reads no rank entry at all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.engine.checkpoint.codec import from_json_tensor, unflatten
from pipeline.engine.checkpoint.dcp_io import read_entries, read_metadata, verify
from pipeline.engine.checkpoint.errors import CheckpointError
from pipeline.engine.checkpoint.files import list_checkpoints, load_file

log = logging.getLogger(__name__)

FORMAT = "cyclegan-pipeline/1"
"""Single files: the training checkpoints of earlier versions, and generator files (`kind: generators`)."""
SHARDED_FORMAT = "cyclegan-pipeline/2"
"""Checkpoint directories: the header entry, `shared/...` entries and `rank/<r>/...` entries per rank."""
HEADER = "header"
SHARED = "shared"


def rank_prefix(rank: int) -> str:
    return f"rank/{rank}"


def rank_skeleton_key(rank: int) -> str:
    return f"rank/{rank}.skeleton"


def _not_ours(path: Path) -> CheckpointError:
    return CheckpointError(
        f"'{path}' is not a training checkpoint of this project (format {SHARDED_FORMAT} or {FORMAT}); to start "
        "from reference-implementation weights use `pipeline.interop`"
    )


def _directory_header(path: Path) -> tuple[Any, dict[str, Any]]:
    metadata = read_metadata(path)
    verify(path, metadata)
    try:
        header = from_json_tensor(read_entries(path, [HEADER], metadata)[HEADER])
    except CheckpointError as err:
        if "entry 'header' is missing" in str(err):
            raise _not_ours(path) from None
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint '{path}': its header is not readable ({err})") from None
    if not isinstance(header, dict) or header.get("format") != SHARDED_FORMAT:
        raise _not_ours(path)
    return metadata, header


def _check_file(path: Path, state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _not_ours(path)
    return state


def read_header(path: Path) -> dict[str, Any]:
    """A checkpoint's header (format, step, counters, config, model, run id, world size), reading nothing else
    of a directory. A single file is read whole (it is one record), and its tensors are dropped."""
    path = Path(path)
    if path.is_dir():
        header = _directory_header(path)[1]
        header.pop("skeleton", None)
        return header
    state = _check_file(path, load_file(path))
    return {key: value for key, value in state.items() if key not in _STATE_KEYS}


_STATE_KEYS = ("nets", "opt_g", "opt_d", "scaler", "ema", "ranks")


def load_checkpoint(path: Path, ranks: str | int | None = "all") -> dict[str, Any]:
    """A checkpoint as one dict; refuses anything that is not plain data or not ours.

    Args:
        path: a checkpoint directory or single file.
        ranks: "all" (every rank's entry), one rank (its entry alone; a rank the checkpoint does not have reads
            none), or None (no rank entries: what translating, evaluating and exporting need).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not path.is_dir():
        state = _check_file(path, load_file(path))
        if ranks != "all" and isinstance(state.get("ranks"), list):
            state["ranks"] = [entry if i == ranks else None for i, entry in enumerate(state["ranks"])]
        return state
    metadata, header = _directory_header(path)
    world = header.get("world_size")
    if not isinstance(world, int) or not 0 < world <= len(metadata.state_dict_metadata):
        raise CheckpointError(f"checkpoint '{path}' is inconsistent: its header's world size is {world!r}")
    wanted = range(world) if ranks == "all" else [ranks] if isinstance(ranks, int) and 0 <= ranks < world else []
    prefixes = tuple(f"{rank_prefix(r)}/" for r in wanted)
    keys = [k for k in metadata.state_dict_metadata
            if k.startswith(f"{SHARED}/") or k.startswith(prefixes) or k in {rank_skeleton_key(r) for r in wanted}]
    tensors = read_entries(path, keys, metadata)
    try:
        state = {**header, **unflatten(header.pop("skeleton"), tensors)}
        state["ranks"] = [None] * world
        for r in wanted:
            state["ranks"][r] = unflatten(from_json_tensor(tensors[rank_skeleton_key(r)]), tensors)
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint '{path}' is inconsistent: entry {err} is missing or unreadable") from None
    return state


def find_latest_loadable(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest step checkpoint in `directory` that can be read, and its header; newer ones that cannot are
    skipped with a warning (best.pt is not a step checkpoint: it is never resumed from)."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return path, read_header(path)
        except CheckpointError as err:
            log.warning("skipping checkpoint of step %d: %s", step, err)
    return None


BEST_NAME = "best.pt"


def read_best(directory: Path) -> dict[str, Any] | None:
    """The `best` record (metric, mode, value, step) of `directory/best.pt`, or None (absent or unreadable)."""
    path = Path(directory) / BEST_NAME
    if not path.exists():
        return None
    try:
        return load_checkpoint(path, ranks=None).get("best")
    except CheckpointError as err:
        log.warning("ignoring %s: %s", path, err)
        return None
