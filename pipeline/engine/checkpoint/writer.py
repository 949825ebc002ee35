"""The run's checkpoint writer: every rank writes its own state, replicated state is written once, in the
background.

`save` blocks a rank only for the copy of its state to host memory (reused buffers, pinned on CUDA); a worker
thread then writes the directory through DCP over a process group of its own (gloo: its collectives stay off the
training's NCCL communicators and off rank 0's GPU) while training continues. One write is in flight at a time:
the next save waits for it. What finished is handed back by `poll` at a step boundary; a final save (the last
step, a stop) waits for its write. A failed write is removed (the metadata, written last, is never there), so the
previous checkpoint stays the newest complete one; rank 0 then applies the retention policy.
"""

from __future__ import annotations

import datetime
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.engine import dist
from pipeline.engine.checkpoint.codec import flatten, json_tensor, unflatten
from pipeline.engine.checkpoint.dcp_io import write_entries
from pipeline.engine.checkpoint.errors import CheckpointWriteError, describe_cause, free_bytes, mib
from pipeline.engine.checkpoint.files import (
    checkpoint_path,
    incomplete_checkpoints,
    list_checkpoints,
    prune,
    remove,
    save_atomic,
    size_on_disk,
    state_bytes,
)
from pipeline.engine.checkpoint.load import HEADER, SHARED, rank_prefix, rank_skeleton_key

log = logging.getLogger(__name__)

UPLOADS = ".upload"
"""Rank 0's folder in the run directory for single-file copies of checkpoints on their way to MLflow."""


@dataclass
class Outcome:
    """What became of one write: `error` is None when it is complete and durable."""

    kind: str
    """"step" (a checkpoint directory) or a name given to `write_main` (a single file: "best")."""
    step: int
    path: Path
    final: bool = False
    error: str | None = None
    blocked_s: float = 0.0
    """Seconds the caller was blocked (the copy to host memory)."""
    durable_s: float = 0.0
    """Seconds from the call until the write was durable (or failed)."""
    bytes_written: int = 0
    """Bytes this rank wrote."""
    packed: Path | None = None
    """A single-file copy for upload (rank 0, when asked for), deleted by whoever uploads it."""
    info: dict[str, Any] = field(default_factory=dict)


class _Worker:
    """One daemon thread running jobs in order (a crash does not wait for it at interpreter exit)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            if job is None:
                return
            try:
                future.set_result(job())
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(err)

    def submit(self, job: Callable[[], Outcome]) -> Future:
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def stop(self, wait: bool) -> None:
        self._jobs.put((None, None))
        if wait:
            self._thread.join()


class Checkpointer:
    """Writes the checkpoints of one run directory; constructed on every rank (a collective when distributed).

    Args:
        directory: the run directory.
        keep_last, keep_every_steps: retention (rank 0 applies it after each complete write).
        min_free_mb: a checkpoint that would leave less free space (judged by the size of the last one) is not
            written.
        is_main: this is rank 0 (retention, the room check, single files).
        timeout_s: how long the writer's collectives wait for a lost peer (dist.timeout_s): a write that takes
            longer on any rank also fails.
    """

    def __init__(self, directory: Path, keep_last: int, keep_every_steps: int = 0, min_free_mb: float = 0.0,
                 is_main: bool = True, timeout_s: float = 300.0) -> None:
        self.directory = Path(directory)
        self.keep_last, self.keep_every_steps = keep_last, keep_every_steps
        self.min_free = int(min_free_mb * 2**20)
        self.is_main = is_main
        self.rank = torch.distributed.get_rank() if dist.is_distributed() else 0
        # A group of its own: the writer thread's collectives never interleave with the training's.
        self.group = (torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
                      if dist.is_distributed() else None)
        self._worker = _Worker()
        self._pending: list[Future] = []
        self._finished: list[Outcome] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self.last_size: int | None = None
        if is_main:
            for path in incomplete_checkpoints(self.directory):
                log.warning("removing %s: an incomplete checkpoint (its write was cut off)", path.name)
                remove(path)
            shutil.rmtree(self.directory / UPLOADS, ignore_errors=True)  # Files for uploads a crash cut off.
            found = list_checkpoints(self.directory)
            self.last_size = size_on_disk(found[-1][1]) if found else None

    def newest(self) -> str:
        """The newest complete checkpoint on disk, in words, for messages about a failed write."""
        found = list_checkpoints(self.directory)
        return f"{found[-1][1].name} (step {found[-1][0]})" if found else "none: no checkpoint was written yet"

    # Saving.

    def save(self, step: int, header: dict[str, Any], shared: dict[str, Any], own: dict[str, Any],
             final: bool = False, pack: Callable[[dict[str, Any]], Any] | None = None) -> None:
        """Write the checkpoint of `step` (all ranks call it together): stage, then write in the background.

        Args:
            header: counters, config and run id (rank 0's is written).
            shared: the replicated state (equal on every rank; written once).
            own: this rank's state.
            final: wait for the write (the last step or a stop).
            pack: rank 0 also writes pack({**header, **shared}) as a single file for upload (`Outcome.packed`).
        """
        t0 = time.perf_counter()
        self._wait_for_writes()  # One write in flight: its staging buffers are about to be reused.
        path = checkpoint_path(self.directory, step)
        try:
            shared_skeleton, shared_tensors = flatten(shared, SHARED)
            own_skeleton, own_tensors = flatten(own, rank_prefix(self.rank))
            staged = self._stage({**shared_tensors, **own_tensors})
            staged[rank_skeleton_key(self.rank)] = json_tensor(own_skeleton)
            if self.is_main:
                staged[HEADER] = json_tensor({**header, "skeleton": shared_skeleton})
            problem = self._room_check(path, shared_tensors, own_tensors) if self.is_main else None
        except Exception as err:  # noqa: BLE001 - a state that cannot be staged (out of pinned memory, ...)
            problem = f"checkpoint '{path}' not written: rank {self.rank} could not stage its state ({err})"
        # Every rank learns of any rank's problem before any writes: all skip the checkpoint together.
        problems = [p for p in dist.gather_objects(problem) if p]
        if problems:
            self._pending.append(_done(Outcome("step", step, path, final, error=str(problems[0]))))
            return
        blocked = time.perf_counter() - t0

        def job() -> Outcome:
            outcome = Outcome("step", step, path, final, blocked_s=blocked)
            try:
                if self.is_main and path.exists():
                    remove(path)  # A stale folder of this name (an earlier, cut-off write).
                write_entries(path, staged, self.group)
            except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
                if isinstance(err, KeyboardInterrupt):
                    raise
                # The metadata is written last, once every rank's data is, and then made durable: with that
                # done, the checkpoint is complete and only DCP's closing broadcast failed (a peer lost after the
                # write: training reports that). Otherwise every rank learnt of the failure from DCP's last
                # collective, after all writes ended.
                if not (self.is_main and getattr(err, "durable", False)):
                    if self.is_main:
                        remove(path)
                    outcome.error = (f"could not write checkpoint '{path}': "
                                     f"{describe_cause(err, self.directory)}. Newest checkpoint: {self.newest()}")
            if outcome.error is None:
                self._after_write(outcome, path, pack, header, shared_skeleton, staged)
            outcome.durable_s = time.perf_counter() - t0
            return outcome

        self._pending.append(self._worker.submit(job))
        if final:
            self._wait_for_writes()
            self._agree_on_final()

    def _after_write(self, outcome: Outcome, path: Path, pack: Callable | None, header: dict[str, Any],
                     skeleton: Any, staged: dict[str, torch.Tensor]) -> None:
        """Bytes written, then rank 0's retention and upload file: a failure here is logged, the checkpoint
        stays complete."""
        try:
            outcome.bytes_written = sum(p.stat().st_size for p in path.glob(f"__{self.rank}_*"))
            if self.is_main:
                self.last_size = size_on_disk(path)
                prune(self.directory, self.keep_last, self.keep_every_steps)
                if pack is not None:
                    outcome.packed = self._pack(path, pack, header, skeleton, staged)
        except Exception as err:  # noqa: BLE001 - housekeeping never fails a written checkpoint
            log.error("checkpoint %s is complete, but pruning older ones or preparing its upload failed: %s",
                      path.name, describe_cause(err, self.directory))

    def _agree_on_final(self) -> None:
        """A final checkpoint ends the run on every rank if it failed on any (the same message everywhere)."""
        mine = self._finished[-1]
        errors = [e for e in dist.gather_objects(mine.error) if e]
        if errors and mine.error is None:
            mine.error = errors[0]

    def _room_check(self, path: Path, shared: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
        known = self.last_size is not None
        world = torch.distributed.get_world_size() if dist.is_distributed() else 1
        needed = self.last_size if known else (state_bytes(shared) + world * state_bytes(own))
        free = free_bytes(self.directory)
        if free is None or free - needed >= self.min_free:
            return None
        what = "the size of the last one" if known else "its tensors alone"
        return (f"checkpoint '{path}' not written: it needs {mib(needed)} ({what}) and the filesystem has "
                f"{mib(free)} free, which would leave less than checkpoint.min_free_mb={self.min_free / 2**20:g} "
                f"MiB: the disk is (nearly) full. Newest checkpoint: {self.newest()}")

    def _stage(self, entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies in host memory that training cannot touch: reused between saves, pinned for CUDA tensors."""
        staged, on_cuda = {}, False
        for key, tensor in entries.items():
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
                self._buffers[key] = buffer
            buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
            on_cuda |= tensor.is_cuda
            staged[key] = buffer
        for key in set(self._buffers) - set(entries):
            del self._buffers[key]
        if on_cuda:
            torch.cuda.synchronize()
        return staged

    def _pack(self, path: Path, pack: Callable, header: dict[str, Any], skeleton: Any,
              staged: dict[str, torch.Tensor]) -> Path | None:
        target = self.directory / UPLOADS / f"{path.name}.pt"
        try:
            save_atomic(pack({**header, **unflatten(skeleton, staged)}), target)
        except CheckpointWriteError as err:
            log.error("%s; the checkpoint itself is complete, its upload is skipped", err)
            return None
        return target

    def write_main(self, kind: str, path: Path, make: Callable[[], Any], step: int,
                   info: dict[str, Any] | None = None) -> None:
        """Rank 0 writes make() as one file in the background (its tensors are copied first); a no-op elsewhere."""
        if not self.is_main:
            return
        t0 = time.perf_counter()
        state = _cpu_copy(make())
        blocked = time.perf_counter() - t0

        def job() -> Outcome:
            outcome = Outcome(kind, step, Path(path), blocked_s=blocked, info=dict(info or {}))
            try:
                outcome.bytes_written = save_atomic(state, path)
            except CheckpointWriteError as err:
                outcome.error = str(err)
            outcome.durable_s = time.perf_counter() - t0
            return outcome

        self._pending.append(self._worker.submit(job))

    # Hearing back.

    def poll(self) -> list[Outcome]:
        """The writes that have ended since the last call, in the order they were started; never blocks."""
        done = []
        while self._pending and self._pending[0].done():
            done.append(self._pending.pop(0).result())
        self._finished.extend(done)
        out, self._finished = self._finished, []
        return out

    def _wait_for_writes(self) -> None:
        while self._pending:
            self._finished.append(self._pending.pop(0).result())

    def wait(self) -> list[Outcome]:
        """Wait for every write in flight; returns what `poll` would."""
        self._wait_for_writes()
        return self.poll()

    def close(self, wait: bool = True) -> list[Outcome]:
        """Finish (or, after a failure elsewhere, abandon) the writes in flight and stop the worker thread."""
        outcomes = self.wait() if wait else []
        self._worker.stop(wait)
        return outcomes


def _done(outcome: Outcome) -> Future:
    future: Future = Future()
    future.set_result(outcome)
    return future


def _cpu_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value

