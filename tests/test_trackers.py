"""The MLflow tracker's uploads: each upload stages its files in a folder of its own."""

from __future__ import annotations

import mlflow

from pipeline.tracking.trackers import MLflowTracker


def test_an_upload_never_takes_the_staging_folder_of_one_still_pending(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri, "tests", "uploads")
    # Upload 0 was sent (its folder removed) while upload 1 waits: folders were named by counting the staging
    # folder's entries, so the next upload was named "1" too and its mkdir raised in the training loop.
    (tracker._staging / "1").mkdir()
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes(name.encode())
        tracker.log_artifact(tmp_path / name, "checkpoints")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x").write_bytes(b"x")
    tracker.log_artifacts(folder, "checkpoints/folder")
    tracker.finish()
    client = mlflow.MlflowClient(uri)
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id, "checkpoints")) == [
        "checkpoints/a.pt", "checkpoints/b.pt", "checkpoints/folder"]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "checkpoints/folder")] == ["checkpoints/folder/x"]
