import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from support.crafted import RunsCode, crafted_directories, header, own, shared, write
from support.runs import ROOT, process_env, train_cmd

from pipeline.engine.checkpoint import (
    FORMAT,
    Checkpointer,
    CheckpointError,
    checkpoint_path,
    find_latest_loadable,
    list_checkpoints,
    load_checkpoint,
    prune,
    read_header,
    save_atomic,
    state_bytes,
)
from pipeline.engine.checkpoint.codec import flatten, unflatten
from pipeline.engine.checkpoint.dcp_io import METADATA, WRITE_DELAY_ENV


def state(step):
    return {"format": FORMAT, "step": step, "w": torch.full((4,), float(step))}


def file_path(directory, step):
    return directory / f"ckpt-{step:09d}.pt"


def test_the_codec_gives_back_an_equal_state_with_int_keys_tuples_and_exact_floats():
    state = {**shared(1), "x": {"t": (1, 2.5, None), "f": 6.666666666666668e-05, "inf": float("inf"),
                                 "$odd": True}}
    skeleton, tensors = flatten(state, "shared")
    back = unflatten(skeleton, tensors)
    assert back["opt_g"]["param_groups"] == state["opt_g"]["param_groups"]
    assert back["opt_g"]["param_groups"][0]["betas"] == (0.5, 0.999)  # A tuple again.
    assert list(back["opt_g"]["state"]) == [0]  # Integer parameter ids, as Optimizer.load_state_dict needs.
    assert back["x"] == state["x"] and torch.equal(back["opt_g"]["state"][0]["exp_avg"],
                                                   state["opt_g"]["state"][0]["exp_avg"])
    assert set(tensors) == {"shared/nets/G_ab/w", "shared/opt_g/state/0/step", "shared/opt_g/state/0/exp_avg",
                            "shared/opt_g/state/0/exp_avg_sq"}
    with pytest.raises(TypeError, match="'bad': a set cannot be stored"):
        flatten({"bad": {1, 2}}, "shared")


def test_a_checkpoint_directory_is_written_and_read_back_by_entry(tmp_path):
    [outcome] = write(tmp_path, 5)
    path = checkpoint_path(tmp_path, 5)
    assert outcome.error is None and outcome.path == path and outcome.bytes_written > 0
    assert sorted(p.name for p in path.iterdir()) == [METADATA, "__0_0.distcp"]
    full = load_checkpoint(path)
    assert full["step"] == 5 and torch.equal(full["nets"]["G_ab"]["w"], torch.full((8,), 5.0))
    assert len(full["ranks"]) == 1 and torch.equal(full["ranks"][0]["pool_a"]["images"], own(0)["pool_a"]["images"])
    assert full["ranks"][0]["rng"]["python"][1] == list(range(625))
    assert load_checkpoint(path, ranks=None)["ranks"] == [None]
    assert load_checkpoint(path, ranks=1)["ranks"] == [None]  # A rank the checkpoint does not have reads nothing.
    assert read_header(path) == header(5)


def test_single_files_of_earlier_versions_still_load(tmp_path):
    path = file_path(tmp_path, 5)
    save_atomic(state(5), path)
    assert load_checkpoint(path)["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000005.pt"]  # no temporary file left
    write(tmp_path, 7)
    assert [(s, p.name) for s, p in list_checkpoints(tmp_path)] == [(5, "ckpt-000000005.pt"), (7, "ckpt-000000007")]


def test_truncated_or_incomplete_newest_is_skipped_with_a_warning(tmp_path, caplog):
    save_atomic(state(10), file_path(tmp_path, 10))
    write(tmp_path, 20)
    write(tmp_path, 30)
    data = checkpoint_path(tmp_path, 30) / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # A copy cut off mid-file.
    (checkpoint_path(tmp_path, 40) / "__0_0.distcp").parent.mkdir()  # A write that never got its metadata.
    with caplog.at_level(logging.WARNING):
        path, found = find_latest_loadable(tmp_path)
    assert path == checkpoint_path(tmp_path, 20) and found["step"] == 20
    assert "skipping checkpoint of step 30" in caplog.text and "__0_0.distcp is truncated" in caplog.text
    assert 40 not in [s for s, _ in list_checkpoints(tmp_path)]  # Incomplete: not a checkpoint at all.
    # The next writer of the run removes what a cut-off write left.
    Checkpointer(tmp_path, keep_last=3).close()
    assert not checkpoint_path(tmp_path, 40).exists() and checkpoint_path(tmp_path, 30).exists()


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


def test_crafted_checkpoint_directories_do_not_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for what, path in crafted_directories(tmp_path).items():
        with pytest.raises(CheckpointError, match="cannot be loaded safely|pickled object|not a tensor"):
            load_checkpoint(path)
        assert not (tmp_path / "pwned").exists(), what
        find_latest_loadable(path.parent)  # What resume=auto reads first.
        assert not (tmp_path / "pwned").exists(), what


def test_foreign_file_is_named(tmp_path):
    path = tmp_path / "latest_net_G_A.pth"
    torch.save({"model.1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(path)


def test_retention_keeps_last_k_and_every_nth_of_either_format(tmp_path):
    for step in range(100, 600, 100):
        save_atomic(state(step), file_path(tmp_path, step))
    writer = Checkpointer(tmp_path, keep_last=2, keep_every_steps=500)
    for step in range(600, 1100, 100):
        writer.save(step, header(step), shared(step), own(0), final=step == 1000)
    writer.close()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [500, 900, 1000]
    prune(tmp_path, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1000]


def test_a_failed_background_write_is_reported_in_words_and_leaves_nothing(tmp_path, monkeypatch):
    writer = Checkpointer(tmp_path, keep_last=3)
    writer.save(1, header(1), shared(1), own(0), final=True)
    assert [o.error for o in writer.poll()] == [None]
    real_fsync = os.fsync

    def full_disk(fd):  # The data reached the page cache; the disk refuses it at the flush.
        if threading.current_thread().name == "checkpoint-writer":
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    writer.save(2, header(2), shared(2), own(0))  # Not final: it returns once staged.
    [failed] = writer.wait()
    monkeypatch.undo()
    assert failed.step == 2 and not failed.final
    assert failed.error.startswith(f"could not write checkpoint '{checkpoint_path(tmp_path, 2)}': the disk is full "
                                   "(No space left on device);")
    assert failed.error.endswith("Newest checkpoint: ckpt-000000001 (step 1)") and "Traceback" not in failed.error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001"]
    writer.save(3, header(3), shared(3), own(0), final=True)  # The next one tries again, and succeeds.
    assert [o.error for o in writer.close()] == [None]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 3]


def test_a_checkpoint_that_would_fill_the_disk_is_not_written(tmp_path):
    writer = Checkpointer(tmp_path, keep_last=3, min_free_mb=0)
    writer.save(1, header(1), shared(1), own(0), final=True)
    writer.poll()
    size = writer.last_size
    assert size == sum(p.stat().st_size for p in checkpoint_path(tmp_path, 1).iterdir())
    # Ask for more room to stay free than this disk has: the next write is refused before it starts. A TiB more
    # than it has now: the disk is shared (the other pytest worker, other jobs), and its free space moves between
    # this reading and the writer's, by far more than the few bytes a checkpoint needs.
    writer.min_free = shutil.disk_usage(tmp_path).free + 2**40
    writer.save(2, header(2), shared(2), own(0), final=True)
    [refused] = writer.poll()
    message = refused.error
    assert f"checkpoint '{checkpoint_path(tmp_path, 2)}' not written: it needs {size:,} bytes" in message
    assert "(the size of the last one) and the filesystem has " in message and "MiB) free" in message
    assert "min_free_mb" in message and message.endswith("Newest checkpoint: ckpt-000000001 (step 1)")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000001"]
    writer.close()
    # A new writer (a resumed process) takes the size of the newest checkpoint; the first checkpoint of a run is
    # judged by its tensors' bytes.
    assert Checkpointer(tmp_path, keep_last=3).last_size == size
    fresh = Checkpointer(tmp_path / "fresh", keep_last=1, min_free_mb=writer.min_free / 2**20)
    fresh.save(1, header(1), {"w": torch.zeros(2)}, {"v": torch.zeros(2, dtype=torch.float64)}, final=True)
    [refused] = fresh.close()
    assert re.search(r"it needs 24 bytes \(.*\) \(its tensors alone\).*no checkpoint", refused.error)
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


def test_a_full_filesystem_is_reported_in_words_and_leaves_no_partial_checkpoint(small_fs):
    fs = small_fs(256 * 1024)
    # Tensor bytes (~160 KB) fit, so the check before writing lets it through; the records of the data file with
    # its metadata (~330 KB) do not, so the background write itself fails on the real filesystem.
    writer = Checkpointer(fs, keep_last=1, min_free_mb=0)
    writer.save(1, header(1), {f"w{i}": torch.zeros(256) for i in range(160)}, own(0), final=True)
    [failed] = writer.close()
    assert failed.error.startswith(f"could not write checkpoint '{checkpoint_path(fs, 1)}': the disk is full "
                                   "(No space left on device);")
    assert " bytes (" in failed.error and "free" in failed.error and "Traceback" not in failed.error
    assert list(fs.iterdir()) == []


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
    size = sum(p.stat().st_size for p in checkpoint_path(run_dir, 2).iterdir())
    # Then another job fills the disk: room for half a checkpoint above the reserve.
    free = shutil.disk_usage(fs).free
    ballast = fs / "ballast"
    ballast.write_bytes(b"\0" * (free - int(0.25 * 2**20) - size // 2))

    second = train()
    err = second.stderr
    assert second.returncode == 2 and "Traceback" not in err, err
    # Step 4: skipped, said once with the figures, and training went on to step 6.
    lines = [line for line in err.splitlines() if "ckpt-000000004' not written" in line]
    assert len(lines) == 1 and f"it needs {size:,} bytes" in lines[0] and "MiB) free" in lines[0]
    assert "Training continues and tries again at the next checkpoint" in lines[0]
    assert "step 6/6" in err
    # Step 6, the last: the same words, and how to go on; the exit status says it failed.
    final = [line for line in err.splitlines() if "ckpt-000000006' not written" in line]
    assert len(final) == 1 and "This was the run's last checkpoint (step 6)" in final[0]
    assert "checkpoint.resume=auto continues from the newest checkpoint" in final[0]
    assert "Newest checkpoint: ckpt-000000002 (step 2)" in final[0]
    # Nothing partial or temporary; the earlier checkpoint loads.
    assert sorted(p.name for p in run_dir.iterdir() if "ckpt" in p.name) == ["ckpt-000000002"]
    assert load_checkpoint(checkpoint_path(run_dir, 2))["step"] == 2

    # Room again: the same command continues from step 2 and finishes.
    ballast.unlink()
    third = train()
    assert third.returncode == 0, third.stderr
    assert "resumed from" in third.stderr and "ckpt-000000002 (step 2)" in third.stderr
    assert [step for step, _ in list_checkpoints(run_dir)] == [6]
    assert load_checkpoint(checkpoint_path(run_dir, 6))["step"] == 6


def test_a_failed_final_checkpoint_ends_every_rank_of_a_distributed_run(tiny, tmp_path):
    # The last checkpoint cannot be written (the disk would be left with less room than checkpoint.min_free_mb);
    # every rank learns it from the same collective and exits non-zero, instead of one hanging until the
    # process-group timeout.
    run_dir = tmp_path / "run"
    args = tiny(**{"train.steps": 4, "checkpoint.every_steps": 2, "report.sample_every_steps": 0})
    first = subprocess.run(train_cmd(2, [*args, "control.stop_after_steps=2"]), capture_output=True, text=True,
                           timeout=180, cwd=tmp_path, env=process_env())
    assert first.returncode == 0, first.stderr[-3000:]
    proc = subprocess.run(train_cmd(2, [*args, "checkpoint.min_free_mb=1e12"]), capture_output=True, text=True,
                          timeout=180, cwd=tmp_path, env=process_env())
    assert proc.returncode != 0
    err = proc.stderr
    assert "[rank 0] ERROR pipeline.train: checkpoint" in err and "ckpt-000000004' not written" in err
    assert "This was the run's last checkpoint (step 4)" in err
    assert "[rank 1] ERROR pipeline.train: the final checkpoint was not written (rank 0's log says why)" in err
    # No traceback from the workers (torchrun's own report of the failed group follows their output).
    assert not re.search(r'File ".*pipeline/\w+\.py", line', err), err
    saved = load_checkpoint(checkpoint_path(run_dir, 2))
    assert saved["step"] == 2 and [s for s, _ in list_checkpoints(run_dir)] == [2]
    # Nothing already recorded is lost: the ranks left together, after rank 0 flushed MLflow.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(saved["mlflow_run_id"]).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(saved["mlflow_run_id"], "loss/D_a")] == [2, 4]


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_and_resume_continues(tiny, tmp_path):
    # Each write holds between its data files and its metadata (the moment a crash hurts most) for 3 s, while
    # training goes on: the checkpoint of step 4 is in flight when the process is SIGKILLed.
    run_dir = tmp_path / "run"
    args = tiny(**{"train.steps": 12, "checkpoint.every_steps": 2, "report.sample_every_steps": 0})
    env = process_env(**{WRITE_DELAY_ENV: "3"})
    proc = subprocess.Popen(train_cmd(0, args), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    in_flight = checkpoint_path(run_dir, 4)
    t0 = time.monotonic()
    while not ((in_flight / "__0_0.distcp").exists() and [s for s, _ in list_checkpoints(run_dir)] == [2]):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() - t0 < 120, "no write of step 4 in flight"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert in_flight.is_dir() and not (in_flight / METADATA).exists()
    assert find_latest_loadable(run_dir)[0] == checkpoint_path(run_dir, 2)

    again = subprocess.run(train_cmd(0, args), env=process_env(), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "removing ckpt-000000004: an incomplete checkpoint" in again.stderr
    assert f"resumed from {checkpoint_path(run_dir, 2)} (step 2)" in again.stderr
    assert load_checkpoint(list_checkpoints(run_dir)[-1][1])["step"] == 12


def test_a_failure_after_the_metadata_is_in_place_keeps_the_complete_checkpoint(tmp_path, monkeypatch):
    # A peer lost during DCP's closing collective: the checkpoint was complete (the metadata is written last,
    # after every rank's data). It was deleted as a failed write, and the run then had none to resume from (seen
    # when a host was killed right after a checkpoint).
    from pipeline.engine.checkpoint import dcp_io

    real_finish = dcp_io._Writer.finish

    def finish_then_lose_a_peer(self, metadata, results):
        real_finish(self, metadata, results)
        raise RuntimeError("Connection closed by peer [10.0.0.2]:49798")

    monkeypatch.setattr(dcp_io._Writer, "finish", finish_then_lose_a_peer)
    [outcome] = write(tmp_path, 4)
    assert outcome.error is None
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4] and load_checkpoint(checkpoint_path(tmp_path, 4))


def test_a_state_that_cannot_be_staged_skips_the_checkpoint_in_words(tmp_path, monkeypatch):
    writer = Checkpointer(tmp_path, keep_last=3)

    def out_of_pinned_memory(self, entries):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(Checkpointer, "_stage", out_of_pinned_memory)
    writer.save(1, header(1), shared(1), own(0), final=True)
    [failed] = writer.close()
    assert failed.error == (f"checkpoint '{checkpoint_path(tmp_path, 1)}' not written: rank 0 could not stage its "
                            "state (CUDA error: out of memory)")
    assert list(tmp_path.iterdir()) == []
