"""The run directory's lock in one process: who counts as alive, the heartbeat, a lock taken away, release."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from pipeline.engine import run_lock


def test_the_lock_is_created_renewed_and_removed(tmp_path):
    lock = run_lock.acquire(tmp_path / "run", stale_after_s=2.0)
    try:
        first = json.loads(lock.path.read_text())
        assert first["pid"] == os.getpid() and first["start_ticks"]
        time.sleep(1.2)  # Renewed every stale_after_s / 4 = 0.5 s.
        assert json.loads(lock.path.read_text())["heartbeat"] > first["heartbeat"]
        with pytest.raises(run_lock.RunDirError, match=rf"in use by another training: pid {os.getpid()} on host"):
            run_lock.acquire(tmp_path / "run", stale_after_s=2.0)
    finally:
        lock.release()
    assert not lock.path.exists()


def test_a_lock_taken_away_is_reported_by_its_heartbeat_and_not_removed_at_release(tmp_path, caplog):
    lock = run_lock.acquire(tmp_path, stale_after_s=2.0)
    other = {**run_lock.identity(), "pid": 1, "host": "elsewhere", "token": "someone-else"}
    taken = lock.path.with_name("taken")
    taken.write_text(json.dumps(other))
    os.replace(taken, lock.path)  # Atomically, as a takeover does.
    with caplog.at_level(logging.ERROR):
        deadline = time.monotonic() + 10
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.1)
    lock.release()
    assert lock.lost and "is no longer this process's" in caplog.text and "pid 1 on host elsewhere" in caplog.text
    assert json.loads(lock.path.read_text())["token"] == "someone-else"  # Not ours to remove.


def test_who_counts_as_alive():
    me = run_lock.identity()
    alive = {**run_lock.identity(), "token": "x"}
    assert run_lock.stale_reason(alive, me, 120) is None  # This very process.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert "no longer runs" in run_lock.stale_reason({**alive, "pid": dead.pid}, me, 120)
    reused = {**alive, "start_ticks": "1"}  # Our PID, but started at another time: a reused PID.
    assert "no longer runs" in run_lock.stale_reason(reused, me, 120)
    rebooted = {**alive, "boot_id": "an-earlier-boot"}
    assert "restarted" in run_lock.stale_reason(rebooted, me, 120)
    remote = {**alive, "host": "node-9", "boot_id": "b", "heartbeat": time.time() - 10}
    assert run_lock.stale_reason(remote, me, 120) is None
    assert "no heartbeat for" in run_lock.stale_reason({**remote, "heartbeat": time.time() - 200}, me, 120)
    requeued = {**me, "slurm_job": "77", "slurm_restart": 2}
    assert "same Slurm job" in run_lock.stale_reason({**remote, "slurm_job": "77", "slurm_restart": 1}, requeued, 120)
    assert run_lock.stale_reason({**remote, "slurm_job": "78", "slurm_restart": 1}, requeued, 120) is None
    restarted = {**me, "elastic_run": "r1", "elastic_restart": 1}
    assert "same torchrun job" in run_lock.stale_reason({**remote, "elastic_run": "r1", "elastic_restart": 0},
                                                        restarted, 120)
    container = {**alive, "pid": 999_999, "pid_ns": "pid:[another]"}  # Same host and boot, PIDs not comparable.
    assert run_lock.stale_reason(container, me, 120) is None


def test_an_exited_but_unreaped_holder_is_dead():
    me = run_lock.identity()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while run_lock._stat(zombie.pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    holder = {**me, "pid": zombie.pid, "start_ticks": run_lock._start_ticks(zombie.pid), "token": "z"}
    assert "no longer runs" in run_lock.stale_reason(holder, me, 120)
    zombie.wait()


def test_an_unreadable_lock_file_is_taken_over(tmp_path, caplog):
    path = tmp_path / run_lock.LOCK_NAME
    path.write_text("{half a lock")
    with pytest.raises(run_lock.RunDirError, match="stays unreadable"):
        run_lock.acquire(tmp_path, stale_after_s=60.0)  # Fresh: maybe being written. Old: left by a crash.
    os.utime(path, (time.time() - 100, time.time() - 100))
    with caplog.at_level(logging.WARNING):
        lock = run_lock.acquire(tmp_path, stale_after_s=60.0)
    lock.release()
    assert "the lock file is unreadable and old" in caplog.text


def test_array_tasks_are_named_as_squeue_names_them(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    assert run_lock.slurm_job() == "101"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_lock.slurm_job() == "100_3"
