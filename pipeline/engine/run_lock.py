"""One owner per run directory: a lock file with the holder's identity and a heartbeat.

Two trainings on one run directory (a requeued job racing a manual resubmission, a second terminal) would write
the same checkpoint names and metrics and resume from each other's files. So rank 0 takes `run_dir/run.lock`
before anything is written, for every rank of its job, and a second process stops at once naming the holder.

How a lock left by a dead process is recognised (no cleanup by hand, ever):
- On the same host (same host name and boot): the holder's PID is gone, or is now another process (its start
  time differs).
- The same Slurm job, requeued: the holder ran an earlier restart of this job (SLURM_RESTART_COUNT), which Slurm
  has ended before requeueing it, on whatever node it ran.
- Another host: its heartbeat (rewritten every `stale_after_s / 4`) is older than `stale_after_s` by our clock.
  This assumes the hosts' clocks agree to well within `stale_after_s` (NTP on a cluster).

Why not `fcntl`/`flock`: on NFS they depend on the client, the server and the lock daemon, and a lock held by a
lost node may never be released. The lock is created atomically instead (a hard link, else O_EXCL), which NFS v3
and later do atomically, and everything else is decided from the file's contents.

What it does not guarantee: two processes that find the same *stale* lock within the same few milliseconds may
both take it over (the second one's takeover is then seen by the first's heartbeat, which logs an error); and a
holder whose heartbeat stalls for `stale_after_s` (a suspended process) can be taken over while it still runs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used: held by another live training, or not creatable or writable."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """Processes in containers that share the host's name and boot (host networking) may not see each other's
    PIDs: only holders in our PID namespace are judged by their PID."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, ...]; empty if unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return []


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (a PID reused by a new process has another)."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _pid_alive(pid: int, start_ticks: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # Another user's live process.
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return False  # Exited, not yet reaped by its parent.
    return not start_ticks or not fields or _start_ticks(pid) == start_ticks


def slurm_job() -> str:
    """This process's Slurm job as squeue names it (array tasks as JOB_TASK); empty outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


def identity(world_size: int = 1) -> dict[str, Any]:
    """Who holds a lock: what a second process needs to judge whether it is alive, and a person to find it."""
    pid = os.getpid()
    return {
        "host": platform.node() or socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "start_ticks": _start_ticks(pid),
        "slurm_job": slurm_job(),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "elastic_run": os.environ.get("TORCHELASTIC_RUN_ID", ""),
        "elastic_restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
        "pid_ns": _pid_namespace(),
        "world_size": world_size,
        "command": " ".join(sys.argv)[:300],
        "since": time.time(),
        "heartbeat": time.time(),
        "token": uuid.uuid4().hex,
    }


def describe(holder: dict[str, Any]) -> str:
    """`pid 123 on host h1 (Slurm job 45), started 2026-12-06 21:30:00 UTC, last heartbeat 3 s ago`."""
    job = f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {since}, last heartbeat "
            f"{age:.0f} s ago")


def stale_reason(holder: dict[str, Any], me: dict[str, Any], stale_after_s: float) -> str | None:
    """Why the lock of `holder` no longer protects anything (its process is gone), or None while it may live."""
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] \
            and int(holder.get("slurm_restart", 0)) < me["slurm_restart"]:
        return (f"it was taken by restart {holder.get('slurm_restart', 0)} of this same Slurm job, which Slurm "
                "ended before requeueing it")
    if holder.get("elastic_run") and holder["elastic_run"] == me["elastic_run"] \
            and int(holder.get("elastic_restart", 0)) < me["elastic_restart"]:
        return (f"it was taken by attempt {holder.get('elastic_restart', 0)} of this same torchrun job, whose "
                "workers torchrun stopped before restarting them")
    if holder.get("host") == me["host"] and holder.get("boot_id", "") == me["boot_id"] \
            and holder.get("pid_ns", "") == me["pid_ns"]:
        if _pid_alive(int(holder.get("pid", 0)), str(holder.get("start_ticks", ""))):
            return None
        return f"process {holder.get('pid')} no longer runs on this host"
    if holder.get("host") == me["host"] and holder.get("boot_id") and me["boot_id"] \
            and holder["boot_id"] != me["boot_id"]:
        return "this host has been restarted since"
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s (over control.lock_stale_s={stale_after_s:g})"
    return None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_new(path: Path, content: dict[str, Any]) -> bool:
    """Create `path` with `content` atomically; False if it exists. A hard link of a complete temporary file
    makes the lock appear whole or not at all; where hard links are refused (some FUSE mounts), O_EXCL."""
    text = json.dumps(content)
    tmp = path.with_name(f".{path.name}.{content['token']}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _age(path: Path) -> float | None:
    """Seconds since `path` was last written, by our clock (None if it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def _replace(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{content['token']}.beat")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)


def prepare_run_dir(run_dir: str | os.PathLike) -> Path:
    """Create the run directory (and parents), or say in one line why it cannot be used."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir '{run_dir}' is a file, not a folder: set run_dir to a folder for this run's "
                          "checkpoints and logs")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"run_dir '{run_dir}' cannot be created ({err.strerror or err}): choose a folder you "
                          "can write to, e.g. run_dir=runs/NAME") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"run_dir '{run_dir}' is not writable by this user: fix its permissions or choose "
                          "another run_dir")
    return path


@dataclass
class RunLock:
    """A held lock; `release()` removes it if it is still ours."""

    path: Path
    content: dict[str, Any]
    interval_s: float
    lost: bool = False

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _ours(self) -> bool:
        holder = _read(self.path)
        return bool(holder) and holder.get("token") == self.content["token"]

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self._ours():
                    self.lost = False  # A takeover that put our lock back.
                else:
                    if not self.lost:
                        holder = _read(self.path)
                        by = describe(holder) if holder else "nobody (the lock file was removed)"
                        log.error("the lock of run directory %s is no longer this process's; it is now held by "
                                  "%s. Two trainings may be writing this run directory: stop one of them",
                                  self.path.parent, by)
                    self.lost = True
                    continue
                self.content["heartbeat"] = time.time()
                _replace(self.path, self.content)
            except OSError as err:  # A full disk or a flaky mount: the next beat tries again.
                log.warning("could not renew the lock of %s (%s)", self.path.parent, err)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            if self._ours():
                self.path.unlink()
        except OSError as err:
            log.warning("could not remove the lock %s (%s); the next run will see its process is gone",
                        self.path, err)



def acquire(run_dir: str | os.PathLike, stale_after_s: float = 120.0, world_size: int = 1) -> RunLock:
    """Take the run directory's lock for this process (and the job whose rank 0 it is).

    Raises:
        RunDirError: another live process holds it (naming it and what to do), or the folder is unusable.
    """
    path = prepare_run_dir(run_dir) / LOCK_NAME
    me = identity(world_size)
    interval_s = max(0.5, min(30.0, stale_after_s / 4))
    for _ in range(20):
        try:
            if _write_new(path, me):
                return RunLock(path, me, interval_s)
        except OSError as err:
            raise RunDirError(f"cannot write the lock file in run_dir '{run_dir}' ({err.strerror or err}): "
                              "check the folder's permissions and free space") from None
        holder = _read(path)
        if holder is None:
            continue  # Released between our attempt and our read: try again.
        if holder.get("token") == me["token"]:
            # Ours after all: an NFS server that answers a retransmitted link with "exists" although the first
            # one made it.
            return RunLock(path, me, interval_s)
        if not holder:
            # Being written (the O_EXCL fallback writes after creating), or damaged: only an old one is dead.
            age = _age(path)
            if age is not None and age < stale_after_s:
                time.sleep(0.25)
                continue
        reason = stale_reason(holder, me, stale_after_s) if holder else "the lock file is unreadable and old"
        if reason is None:
            raise RunDirError(
                f"run_dir '{run_dir}' is in use by another training: {describe(holder)} (details in {path}). "
                f"Wait for it to end, stop it (it checkpoints on SIGTERM), "
                f"or give this run another run_dir. If that process is gone (a lost node), its lock expires "
                f"{stale_after_s:g} s after its last heartbeat (control.lock_stale_s); start again then.")
        log.warning("run directory %s: taking over the lock of %s: %s", run_dir,
                    describe(holder) if holder else "an unknown process", reason)
        _take_away(path, holder)
    raise RunDirError(f"could not take the lock of run_dir '{run_dir}': {path} stays unreadable or other "
                      "processes keep taking it; is the same job starting several times? If no training runs there, "
                      "delete that file")


def _take_away(path: Path, stale: dict[str, Any]) -> None:
    """Remove the stale lock, unless another process replaced it meanwhile (then it is put back)."""
    moved = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return
    if _read(moved) != stale:
        try:
            os.link(moved, path)  # A fresh lock taken by someone else: put it back; our next try sees it.
        except OSError:
            pass
    moved.unlink(missing_ok=True)
