import logging
import os
import pickle

import pytest
import torch

from pipeline.checkpoint import (
    FORMAT,
    CheckpointError,
    CheckpointWriter,
    checkpoint_path,
    find_latest_loadable,
    list_checkpoints,
    load_checkpoint,
    prune,
    save_atomic,
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
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.save(state(2), 2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000001.pt"]
    monkeypatch.undo()
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["step"] == 1
