import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.runs import ROOT, process_env, train_cmd

from pipeline.engine.checkpoint import (
    FORMAT,
    CheckpointError,
    CheckpointWriteError,
    CheckpointWriter,
    checkpoint_path,
    find_latest_loadable,
    list_checkpoints,
    load_checkpoint,
    prune,
    save_atomic,
    state_bytes,
)


def state(step):
    return {"format": FORMAT, "step": step, "w": torch.full((4,), float(step))}


def test_atomic_save_and_load(tmp_path):
    path = checkpoint_path(tmp_path, 5)
    save_atomic(state(5), path)
    assert load_checkpoint(path)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000005.pt"]  # no temporary file left


def test_truncated_newest_is_skipped_with_a_warning(tmp_path, caplog):
    save_atomic(state(10), checkpoint_path(tmp_path, 10))
    save_atomic(state(20), checkpoint_path(tmp_path, 20))
    newest = checkpoint_path(tmp_path, 20)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # A write cut off mid-file (not through save_atomic).
    with caplog.at_level(logging.WARNING):
        path, loaded = find_latest_loadable(tmp_path)
    assert path == checkpoint_path(tmp_path, 10) and loaded["step"] == 10
    assert "skipping checkpoint of step 20" in caplog.text


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({"format": FORMAT, "step": 1, "evil": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not (tmp_path / "pwned").exists()


def test_foreign_file_is_named(tmp_path):
    path = tmp_path / "latest_net_G_A.pth"
    torch.save({"model.1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(path)


def test_retention_keeps_last_k_and_every_nth(tmp_path):
    for step in range(100, 1100, 100):
        save_atomic(state(step), checkpoint_path(tmp_path, step))
    prune(tmp_path, keep_last=2, keep_every_steps=500)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [500, 900, 1000]


def test_failed_write_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    writer = CheckpointWriter(tmp_path, keep_last=1)
    writer.save(state(1), 1)

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="after 7 bytes: the disk is full \\(No space left on device\\)"):
        writer.save(state(2), 2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000001.pt"]
    monkeypatch.undo()
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["step"] == 1


def test_any_failure_of_the_write_is_a_checkpoint_error_and_leaves_nothing(tmp_path, monkeypatch):
    writer = CheckpointWriter(tmp_path, keep_last=3)
    writer.save(state(1), 1)
    # torch's zip writer reports a failed write as a RuntimeError, not an OSError.
    def zip_failure(obj, handle, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", zip_failure)
    with pytest.raises(CheckpointWriteError, match="RuntimeError: .*unexpected pos.*Newest checkpoint: "
                                                   "ckpt-000000001.pt \\(step 1\\)"):
        writer.save(state(2), 2)
    monkeypatch.undo()
    # The target name taken by a folder: the rename fails.
    checkpoint_path(tmp_path, 3).mkdir()
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint .*ckpt-000000003.pt"):
        writer.save(state(3), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt", "ckpt-000000003.pt"]
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["step"] == 1


def test_a_checkpoint_that_would_fill_the_disk_is_not_written(tmp_path):
    import shutil

    writer = CheckpointWriter(tmp_path, keep_last=3, min_free_mb=0)
    writer.save(state(1), 1)
    assert writer.last_size == checkpoint_path(tmp_path, 1).stat().st_size
    # Ask for more room to stay free than this disk has: the next write is refused before it starts. A TiB more
    # than it has now: the disk is shared (the other pytest worker, other jobs), and its free space moves between
    # this reading and the writer's, by far more than the few bytes a checkpoint needs.
    free = shutil.disk_usage(tmp_path).free + 2**40
    writer.min_free = free
    with pytest.raises(CheckpointWriteError) as caught:
        writer.save(state(2), 2)
    message = str(caught.value)
    assert f"checkpoint '{checkpoint_path(tmp_path, 2)}' not written: it needs {writer.last_size:,} bytes" in message
    assert "(the size of the last one) and the filesystem has " in message and "MiB) free" in message
    assert "min_free_mb" in message
    assert message.endswith("Newest checkpoint: ckpt-000000001.pt (step 1)")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000001.pt"]
    # A new writer (a resumed process) takes the size of the newest file; the first checkpoint of a run is judged
    # by its tensors' bytes.
    assert CheckpointWriter(tmp_path, keep_last=3).last_size == writer.last_size
    fresh = CheckpointWriter(tmp_path / "fresh", keep_last=1, min_free_mb=free / 2**20)
    with pytest.raises(CheckpointWriteError, match="it needs 16 bytes \\(.*\\) \\(its tensors alone\\).*no checkpoint"):
        fresh.save(state(1), 1)
    assert state_bytes({"a": [torch.zeros(3), {"b": torch.zeros(2, dtype=torch.float64)}], "n": 1}) == 28


# A real filesystem too small for the checkpoints.


@pytest.fixture
def small_fs(tmp_path):
    """Factory: small_fs(bytes) mounts a tmpfs of that size and returns its folder; unmounted afterwards.

    Needs root (CI runs as root); without it the tests that use it are skipped with that reason.
    """
    mounts = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs as root); the full-disk path is also "
                        "covered by the monkeypatched tests above")
        folder = tmp_path / f"fs{len(mounts)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_filesystem_is_reported_with_the_bytes_and_leaves_no_file(small_fs):
    fs = small_fs(64 * 1024)
    # Tensor bytes (~4 KB) fit, so the check before writing lets it through; the file (~200 KB: each tensor is
    # a record of its own) does not, so the write itself fails on the real filesystem.
    big = {"format": FORMAT, "step": 1, "w": [torch.zeros(1) for _ in range(1000)]}
    writer = CheckpointWriter(fs, keep_last=1, min_free_mb=0)
    with pytest.raises(CheckpointWriteError) as caught:
        writer.save(big, 1)
    message = str(caught.value)
    assert f"could not write checkpoint '{checkpoint_path(fs, 1)}' after " in message
    assert "the disk is full (No space left on device);" in message and " bytes (" in message and "free" in message
    assert "inline_container" not in message and list(fs.iterdir()) == []
    # torch.save alone raises its zip writer's RuntimeError here: that is what save_atomic translates.
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save(big, fs / "plain.pt")


def test_training_on_a_disk_that_fills_up_keeps_going_fails_cleanly_at_the_end_and_resumes(tiny, tmp_path,
                                                                                           small_fs):
    fs = small_fs(4 * 2**20)
    run_dir = fs / "run"
    args = tiny(run_dir=str(run_dir), **{"train.steps": 6, "checkpoint.every_steps": 2, "checkpoint.keep_last": 1,
                                         "checkpoint.min_free_mb": 0.25, "report.sample_every_steps": 0})

    def train(*extra: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-m", "pipeline.train", *args, *extra], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)

    # Two steps with room to spare: the checkpoint of step 2 sets the size of the next ones.
    first = train("control.stop_after_steps=2")
    assert first.returncode == 3, first.stderr
    size = checkpoint_path(run_dir, 2).stat().st_size
    # Then another job fills the disk: room for half a checkpoint above the reserve.
    free = shutil.disk_usage(fs).free
    ballast = fs / "ballast"
    ballast.write_bytes(b"\0" * (free - int(0.25 * 2**20) - size // 2))

    second = train()
    err = second.stderr
    assert second.returncode == 2 and "Traceback" not in err, err
    # Step 4: skipped, said once with the figures, and training went on to step 6.
    lines = [line for line in err.splitlines() if "ckpt-000000004.pt' not written" in line]
    assert len(lines) == 1 and f"it needs {size:,} bytes" in lines[0] and "MiB) free" in lines[0]
    assert "Training continues and tries again at the next checkpoint" in lines[0]
    assert "step 6/6" in err
    # Step 6, the last: the same words, and how to go on; the exit status says it failed.
    final = [line for line in err.splitlines() if "ckpt-000000006.pt' not written" in line]
    assert len(final) == 1 and "This was the run's last checkpoint (step 6)" in final[0]
    assert "checkpoint.resume=auto continues from the newest checkpoint" in final[0]
    assert "Newest checkpoint: ckpt-000000002.pt (step 2)" in final[0]
    # Nothing partial or temporary; the earlier checkpoint loads.
    assert sorted(p.name for p in run_dir.iterdir() if "ckpt" in p.name) == ["ckpt-000000002.pt"]
    assert load_checkpoint(checkpoint_path(run_dir, 2))["step"] == 2

    # Room again: the same command continues from step 2 and finishes.
    ballast.unlink()
    third = train()
    assert third.returncode == 0, third.stderr
    assert "resumed from" in third.stderr and "ckpt-000000002.pt (step 2)" in third.stderr
    assert [step for step, _ in list_checkpoints(run_dir)] == [6]
    assert load_checkpoint(checkpoint_path(run_dir, 6))["step"] == 6


def test_a_failed_final_checkpoint_ends_every_rank_of_a_distributed_run(tiny, tmp_path):
    # Rank 0 cannot write the last checkpoint (its name is taken by a folder); rank 1 waits in the collective
    # that tells it so, and both exit non-zero instead of rank 1 hanging until the process-group timeout.
    run_dir = tmp_path / "run"
    checkpoint_path(run_dir, 4).mkdir(parents=True)
    cmd = train_cmd(2, tiny(**{"train.steps": 4, "checkpoint.every_steps": 2, "report.sample_every_steps": 0}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=process_env())
    assert proc.returncode != 0
    err = proc.stderr
    assert "[rank 0] ERROR pipeline.train: could not write checkpoint" in err and "ckpt-000000004.pt" in err
    assert "This was the run's last checkpoint (step 4)" in err
    assert "[rank 1] ERROR pipeline.train: rank 0 could not write the final checkpoint" in err
    # No traceback from the workers (torchrun's own report of the failed group follows their output).
    assert not re.search(r'File ".*pipeline/\w+\.py", line', err), err
    saved = load_checkpoint(checkpoint_path(run_dir, 2))
    assert saved["step"] == 2 and not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    # Nothing already recorded is lost: the ranks left together, after rank 0 flushed MLflow.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(saved["mlflow_run_id"]).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(saved["mlflow_run_id"], "loss/D_a")] == [2, 4]
