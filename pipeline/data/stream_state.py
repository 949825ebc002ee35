"""Where a rank's training streams stand, as a checkpoint holds it, and how a resume continues them.

A rank's entry in a checkpoint holds its loader's state (each worker's streams: see `ShuffledSamples`) with
what that state depends on: the world size and worker count (streams are per rank and worker), the shuffle
buffer, and the shard lists. When all of these match, the resumed streams continue bit for bit. When one changed,
the positions mean nothing for the new streams: each rank starts new ones, with a warning. A checkpoint of an
earlier version, which has no stream state, is resumed as it always was, by reading again what the rank consumed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pipeline.data")


@dataclass(frozen=True)
class StreamStart:
    """How a rank's loader starts: from a saved `state`, by re-reading `start_batch` batches, or with new streams
    from step `fresh_from` (see `train_loader`)."""

    state: dict[str, Any] | None = None
    start_batch: int = 0
    fresh_from: int = 0


def stream_identity(data_cfg: Any, urls: dict[str, list[str]], world_size: int) -> dict[str, Any]:
    """What a saved stream state is valid for."""
    shards = hashlib.sha256("\n".join([*urls["A"], "", *urls["B"]]).encode()).hexdigest()[:16]
    return {"world_size": world_size, "workers": data_cfg.workers, "shuffle_buffer": data_cfg.shuffle_buffer,
            "shards": shards, "shard_count": [len(urls["A"]), len(urls["B"])]}


def saved_streams(loader: Any, identity: dict[str, Any]) -> dict[str, Any]:
    """A rank's stream entry for a checkpoint: its loader's state, with what it is valid for."""
    return {"identity": identity, "loader": loader.state_dict()}


_CHANGES = {"world_size": "the world size", "workers": "data.workers", "shuffle_buffer": "data.shuffle_buffer",
            "shards": "the shard lists"}


def stream_start(checkpoint: dict[str, Any] | None, rank: int, identity: dict[str, Any]) -> StreamStart:
    """How this rank's streams resume from `checkpoint` (None: a new run)."""
    if checkpoint is None or not checkpoint.get("step"):
        return StreamStart()
    step = checkpoint["step"]
    ranks = checkpoint.get("ranks") or []
    entry = ranks[rank] if rank < len(ranks) and ranks[rank] is not None else {}
    saved = entry.get("stream")
    if saved is None:
        if checkpoint.get("world_size", len(ranks)) != identity["world_size"]:
            return StreamStart(fresh_from=step)
        # An earlier version's checkpoint: its streams are found again by replaying them.
        log.info("the checkpoint holds no stream positions (written by an earlier version): each stream reads "
                 "again the samples it consumed before step %d (not decoded), once", step)
        return StreamStart(start_batch=step)
    was = saved["identity"]
    changed = [_change(key, was, identity) for key in _CHANGES if was.get(key) != identity[key]]
    if not changed:
        return StreamStart(state=saved["loader"])
    log.warning("the checkpoint's stream positions do not fit this run (%s): rank %d starts new streams at step %d "
                "(seeded apart from the run's first ones), so the run continues but not bit for bit",
                "; ".join(changed), rank, step)
    return StreamStart(fresh_from=step)


def _change(key: str, was: dict[str, Any], now: dict[str, Any]) -> str:
    if key == "shards":
        before, after = ("+".join(map(str, d.get("shard_count", "?"))) for d in (was, now))
        return f"the shard lists changed ({before} -> {after} shards for A+B)"
    return f"{_CHANGES[key]} {was.get(key)} -> {now[key]}"
