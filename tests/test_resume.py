"""Losing no work: signals, killed workers and new processes resume exactly (real processes, real files)."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from support.http_server import Server
from support.runs import nets_equal, process_env, tiny_overrides, train_cmd

from pipeline.engine.checkpoint import list_checkpoints, load_checkpoint
from pipeline.engine.stop import EXIT_STOPPED

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def metric_steps(tmp_path, run_id: str, key: str) -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.fixture
def served(shards):
    """The training shards from a real HTTP server (a pattern per domain, its URLs joined by '::')."""
    folders = {split: Path(sorted(glob.glob(shards[split]))[0]).parent for split in ("trainA", "trainB")}
    server = Server(folders["trainA"].parent)
    yield {**shards, **{split: "::".join(f"{server.url}/{split}/{p.name}" for p in sorted(folder.glob("*.tar")))
                        for split, folder in folders.items()}}
    server.close()


@pytest.mark.parametrize("nproc,norm,workers,where,variant", [(0, "instance", 0, "http", "colour"),
                                                              (2, "instance", 2, "local", "reference"),
                                                              (2, "batch", 1, "http", "reference")],
                         ids=["1-process-0-workers-http-colour-networks", "2-ranks-2-workers-local",
                              "2-ranks-batchnorm-http"])
def test_new_process_resume_equals_a_straight_run_bitwise(shards, served, tmp_path, nproc, norm, workers, where,
                                                          variant):
    # Batch norm: the running statistics differ between ranks between DDP's broadcasts of rank 0's; a checkpoint
    # must hold rank 0's (the replicated state is otherwise written by whichever rank DCP's planner picks).
    # The colour networks (configs/colour.yaml's): spectral norm's power-iteration vectors are buffers that every
    # forward pass changes; the colour discriminator has them in its statistics head too.
    common = {"train.steps": 8, "checkpoint.every_steps": 8, "data.workers": workers, "report.log_every_steps": 1,
              "model.norm": norm, "perf.fused_calls": norm != "batch",  # Batch norm couples a fused call's images.
              "model.g_variant": variant, "model.d_variant": variant,
              # The colour generator's skip fitted from the shards (a buffer): the resumed half reads it back.
              "model.colour_start": "transfer" if variant == "colour" else "identity"}
    source = served if where == "http" else shards
    straight = tiny_overrides(source, tmp_path / "straight", **common)
    chunked = tiny_overrides(source, tmp_path / "chunked", **common, **{"control.stop_after_steps": 4})
    straight_run = subprocess.run(train_cmd(nproc, straight), env=process_env(), cwd=tmp_path, capture_output=True)
    assert straight_run.returncode == 0
    first = subprocess.run(train_cmd(nproc, chunked), env=process_env(), cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == (0 if nproc else EXIT_STOPPED), first.stderr[-3000:]
    assert "stopped after step 4 (control.stop_after_steps)" in first.stderr
    assert [s for s, _ in list_checkpoints(tmp_path / "chunked")] == [4]
    halfway = load_checkpoint(tmp_path / "chunked" / "ckpt-000000004")
    assert all(entry["stream"]["loader"] for entry in halfway["ranks"])  # Where every rank's streams stand.
    second = subprocess.run(train_cmd(nproc, chunked), env=process_env(), cwd=tmp_path, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stream" not in second.stderr  # Continued from the saved positions: neither replayed nor started anew.
    # The colour map is fitted once, by the fresh run; the resumed half reads it from the checkpoint.
    assert ("starts as the colour transfer" in first.stderr) == (variant == "colour")
    assert "starts as the colour transfer" not in second.stderr

    a = load_checkpoint(tmp_path / "straight" / "ckpt-000000008")
    b = load_checkpoint(tmp_path / "chunked" / "ckpt-000000008")
    assert nets_equal(a, b)
    if variant == "colour":  # Fitted, not the identity, and not trained.
        assert not torch.equal(a["nets"]["G_ab"]["skip.weight"], torch.eye(3))
        assert torch.equal(a["nets"]["G_ab"]["skip.weight"], halfway["nets"]["G_ab"]["skip.weight"])
    assert len(a["ranks"]) == len(b["ranks"]) == max(nproc, 1)
    for ra, rb in zip(a["ranks"], b["ranks"]):
        assert torch.equal(ra["pool_a"]["images"], rb["pool_a"]["images"])
        assert torch.equal(ra["rng"]["torch"], rb["rng"]["torch"])
    for key in ("opt_g", "opt_d"):
        for pid, st in a[key]["state"].items():
            assert torch.equal(st["exp_avg_sq"], b[key]["state"][pid]["exp_avg_sq"])
    # Learning rate and losses logged by the two halves equal the straight run's, step for step.
    lines = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("straight", "chunked")}
    assert lines["straight"] == [{**x, **{k: v for k, v in y.items() if k.startswith("perf/")}}
                                 for x, y in zip(lines["chunked"], lines["straight"])]
    steps = metric_steps(tmp_path, b["mlflow_run_id"], "lr")
    assert steps == list(range(1, 9))  # one continuous series: no gap, no duplicate
    assert metric_steps(tmp_path, b["mlflow_run_id"], "loss/G_ab/cycle") == list(range(1, 9))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_mid_run_writes_a_checkpoint_and_resume_finishes(shards, tmp_path, sig):
    # MLflow off: the resumed MLflow series is checked above; here the run's own metrics file shows the steps.
    # 100 steps of ~60 ms: the signal comes after step 3, long before the end, and resuming takes seconds.
    overrides = tiny_overrides(shards, tmp_path / "run", **{"train.steps": 100, "checkpoint.every_steps": 1000,
                                                            "report.log_every_steps": 1, "tracking.enabled": False,
                                                            "report.sample_every_steps": 0})
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = subprocess.Popen(train_cmd(0, overrides), env=process_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 60, "three steps", proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == EXIT_STOPPED
    log = proc.stderr.read()
    assert f"received {signal.Signals(sig).name}" in log
    (step, path), = list_checkpoints(tmp_path / "run")
    assert 3 <= step < 100 and load_checkpoint(path)["step"] == step
    done = subprocess.run(train_cmd(0, overrides), env=process_env(), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming at step {step}" in done.stderr
    assert list_checkpoints(tmp_path / "run")[-1][0] == 100
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 101))


def test_torchrun_restarts_a_killed_worker_and_the_job_completes(shards, tmp_path):
    total = 80  # The kill comes right after the first checkpoint (step 20), long before the end.
    overrides = tiny_overrides(shards, tmp_path / "run", **{"train.steps": total, "checkpoint.every_steps": 20,
                                                            "report.log_every_steps": 5})
    proc = subprocess.Popen(train_cmd(2, overrides, "--max-restarts=1"), env=process_env(), cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list_checkpoints(tmp_path / "run")) >= 1, 120, "a first checkpoint", proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    _, log = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-3000:]
    assert "resumed from" in log
    final = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])
    assert final["step"] == total and final["images_seen"] == 2 * total
    steps = metric_steps(tmp_path, final["mlflow_run_id"], "lr")
    assert steps == list(range(5, total + 1, 5))  # the restart re-ran steps, but logged each once


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_world_size_change_resumes_with_a_warning(shards, tmp_path, before, after):
    overrides = tiny_overrides(shards, tmp_path / "run", **{"train.steps": 6, "checkpoint.every_steps": 3,
                                                            "control.stop_after_steps": 3})
    nproc = {1: 0, 2: 2}
    first = subprocess.run(train_cmd(nproc[before], overrides), env=process_env(), cwd=tmp_path,
                           capture_output=True, text=True)
    assert first.returncode == (0 if before > 1 else EXIT_STOPPED), first.stderr[-3000:]
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])["world_size"] == before
    finish = [o for o in overrides if not o.startswith("control.stop_after_steps")]
    second = subprocess.run(train_cmd(nproc[after], finish), env=process_env(), cwd=tmp_path, capture_output=True,
                            text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"written by {before} ranks, this run has {after}" in second.stderr
    assert f"(the world size {before} -> {after}): rank 0 starts new streams at step 3" in second.stderr
    assert "resumed from" in second.stderr and "(step 3)" in second.stderr
    final = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])
    assert final["step"] == 6 and final["world_size"] == after
    assert final["images_seen"] == before * 3 + after * 3
    # Each rank of the new run wrote its own pools: the pools of a rank the old run did not have were refilled.
    assert all(len(entry["pool_a"]["images"]) == 2 for entry in final["ranks"])
    # What a resuming rank reads: the replicated state and its own entry, no other rank's.
    own = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1], ranks=after - 1)
    assert own["ranks"][after - 1] is not None and all(e is None for e in own["ranks"][:after - 1])
    assert nets_equal(own, final)


def test_a_rank_that_cannot_read_its_entry_fails_every_rank_with_its_reason(shards, tmp_path):
    from pipeline.engine.checkpoint.dcp_io import read_metadata

    overrides = tiny_overrides(shards, tmp_path / "run", **{"train.steps": 6, "checkpoint.every_steps": 3,
                                                            "report.sample_every_steps": 0})
    first = subprocess.run(train_cmd(2, [*overrides, "control.stop_after_steps=3"]), env=process_env(),
                           cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    # Damage a record only rank 1 reads (its pool), keeping the file's length: rank 0 sees a sound checkpoint.
    path = list_checkpoints(tmp_path / "run")[-1][1]
    info = read_metadata(path).storage_data
    [record] = [v for k, v in info.items() if k.fqn == "rank/1/pool_a/images"]
    data = path / record.relative_path
    blob = bytearray(data.read_bytes())
    blob[record.offset:record.offset + 64] = b"\x00" * 64
    data.write_bytes(bytes(blob))
    second = subprocess.run(train_cmd(2, overrides), env=process_env(), cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode != 0
    err = second.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] ERROR pipeline.train: rank 1: checkpoint '{path}' cannot be loaded safely" in err, err
    assert not re.search(r'File ".*pipeline/[\w/]+\.py", line', err), err  # No traceback from the workers.
