"""The accidents of real folders and real clusters, each through the real command (README, "When things go
wrong"): the exit code, the one line that names the thing and the fix, no Python traceback, and nothing already
written lost or changed.

Each test here is a row of that table; rows whose accident is tested elsewhere name their test in the table.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.http_server import Server
from support.runs import ROOT, process_env, tiny_overrides, torchrun_cmd, train_cmd

from pipeline.engine import run_lock

TIMEOUT = 240


def train(overrides: list[str], timeout: float = TIMEOUT, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(0, overrides), capture_output=True, text=True, timeout=timeout,
                          env=process_env(**(env or {})), cwd=cwd or ROOT)


def offline(shards: dict[str, str], run_dir: Path, **extra) -> list[str]:
    """A tiny run without MLflow (its import and store cost seconds that these tests do not need)."""
    return tiny_overrides(shards, run_dir, **{"tracking.enabled": False, **extra})


def one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """The run ended with exit code 2 and one ERROR line holding every phrase, and no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def trained(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes: what "nothing lost or changed" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A finished tiny run: accidents aimed at it must leave every one of its files as it was."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    trained(train(offline(shards, run_dir)))
    return run_dir


def tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "png")
    return out.getvalue()


# The run directory: one owner.


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_second_training_on_a_run_directory_exits_2_naming_the_first_and_a_killed_holder_never_blocks_resume(
        shards, tmp_path):
    run_dir = tmp_path / "run"
    long = offline(shards, run_dir, **{"train.steps": 100000, "checkpoint.every_steps": 20,
                                      "report.log_every_steps": 1000, "report.sample_every_steps": 0})
    first = subprocess.Popen(train_cmd(0, long), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=process_env(), cwd=ROOT)
    try:
        wait_for(lambda: list(run_dir.glob("ckpt-*/.metadata")), what="the first run's first checkpoint")
        holder = json.loads((run_dir / run_lock.LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == platform.node()
        started = time.monotonic()
        second = train(offline(shards, run_dir, **{"train.steps": 100000}))
        waited = time.monotonic() - started
        one_line_error(second, f"run_dir '{run_dir}' is in use by another training", f"pid {first.pid}",
                       f"on host {platform.node()}", "control.lock_stale_s")
        assert waited < 30  # At once: the seconds of Python and torch starting up, no waiting on the lock.
        assert first.poll() is None  # The first one goes on, untouched.
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    newest = max(p.parent.name for p in run_dir.glob("ckpt-*/.metadata"))
    assert (run_dir / run_lock.LOCK_NAME).exists()  # SIGKILL left its lock behind.
    steps = int(newest.split("-")[1]) + 2
    again = train(offline(shards, run_dir, **{"train.steps": steps, "checkpoint.every_steps": 20}))
    trained(again)
    assert f"process {first.pid} no longer runs on this host" in again.stderr
    assert f"resumed from {run_dir / newest}" in again.stderr
    assert not (run_dir / run_lock.LOCK_NAME).exists()  # Released at the end.


def crafted_lock(run_dir: Path, **fields) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {**run_lock.identity(), **fields}
    (run_dir / run_lock.LOCK_NAME).write_text(json.dumps(holder))
    return holder


@pytest.mark.parametrize("heartbeat_age_s, stale_s, blocked", [(0, 600, True), (300, 60, False)])
def test_a_lock_held_on_another_host_blocks_until_its_heartbeat_is_stale(shards, tmp_path, heartbeat_age_s, stale_s,
                                                                         blocked):
    run_dir = tmp_path / "run"
    crafted_lock(run_dir, host="node-17", boot_id="another-boot", pid=4242, slurm_job="",
                 heartbeat=time.time() - heartbeat_age_s)
    result = train(offline(shards, run_dir, **{"control.lock_stale_s": stale_s}))
    if blocked:
        one_line_error(result, "pid 4242 on host node-17", "last heartbeat",
                       "expires 600 s after its last heartbeat")
        assert not list(run_dir.glob("ckpt-*"))
    else:
        trained(result)
        assert "pid 4242 on host node-17" in result.stderr
        assert re.search(r"no heartbeat for 3\d\d s \(over control.lock_stale_s=60\)", result.stderr)


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_own_earlier_restart(shards, tmp_path):
    """A requeue onto another node finds its predecessor's lock with a fresh heartbeat (it was killed moments
    ago): the same job id with a lower restart count is never a live competitor. Another job is."""
    run_dir = tmp_path / "run"
    crafted_lock(run_dir, host="node-3", boot_id="b", pid=99, slurm_job="5150", slurm_restart=0)
    other_job = train(offline(shards, run_dir), env={"SLURM_JOB_ID": "6000"})
    one_line_error(other_job, "(Slurm job 5150)")
    requeued = train(offline(shards, run_dir), env={"SLURM_JOB_ID": "5150", "SLURM_RESTART_COUNT": "1"})
    trained(requeued)
    assert "restart 0 of this same Slurm job" in requeued.stderr


def test_every_rank_of_a_job_stops_when_its_run_directory_is_held(shards, tmp_path):
    """Rank 0 takes the lock for the job; when it cannot, every rank stops with the reason (no rank waits in a
    collective for a rank that left). Held here by this live test process."""
    run_dir = tmp_path / "run"
    crafted_lock(run_dir)  # This process: alive on this host.
    result = subprocess.run(torchrun_cmd(2, "-m", "pipeline.train", *offline(shards, run_dir)),
                            capture_output=True, text=True, timeout=TIMEOUT, env=process_env(), cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.count(f"is in use by another training: pid {os.getpid()}") == 2  # Ranks 0 and 1.
    assert not list(run_dir.glob("ckpt-*"))


# Tracking never decides whether training starts.


@pytest.mark.parametrize("runs", [2, 4])
def test_runs_started_together_on_a_new_sqlite_store_all_train_and_are_recorded(shards, tmp_path, runs):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [subprocess.Popen(train_cmd(0, tiny_overrides(shards, tmp_path / f"run{i}", **{"tracking.uri": uri})),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=process_env(),
                              cwd=ROOT) for i in range(runs)]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert sorted(r.info.run_name for r in found) == sorted(f"run{i}" for i in range(runs))
    assert all(r.info.status == "FINISHED" and r.data.metrics.get("lr") is not None for r in found)


def test_a_store_that_cannot_be_opened_trains_anyway_and_sync_uploads_the_record_later(shards, tmp_path):
    run_dir = tmp_path / "run"
    down = "http://127.0.0.1:9"  # The discard port: nothing listens there.
    started = time.monotonic()
    result = train(tiny_overrides(shards, run_dir, **{"tracking.uri": down, "tracking.start_timeout_s": 3}))
    trained(result)
    assert time.monotonic() - started < 120
    assert f"MLflow at '{down}' could not be opened within 3 s" in result.stderr
    assert f"python -m pipeline.sync {run_dir}" in result.stderr
    assert list(run_dir.glob("ckpt-*")) and (run_dir / "metrics.jsonl").read_text()

    uri = f"sqlite:///{tmp_path / 'later.db'}"
    sync = subprocess.run([sys.executable, "-m", "pipeline.sync", str(run_dir), "--uri", uri],
                          capture_output=True, text=True, timeout=TIMEOUT, env=process_env(), cwd=ROOT)
    assert sync.returncode == 0, sync.stderr
    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == logged
    assert run.data.params["model.ngf"] == "4"


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers: a hung server, the slowest way to fail."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("store, wants", [
    ("down", "could not be opened within 2 s (tracking.start_timeout_s)"),
    ("hung", "could not be opened within 2 s (tracking.start_timeout_s)"),
    ("bad scheme", "cannot be used"),
])
def test_tracking_required_stops_the_run_when_the_store_cannot_be_opened(shards, tmp_path, silent_server, store,
                                                                         wants):
    uri = {"down": "http://127.0.0.1:9", "hung": silent_server, "bad scheme": "foo://bar"}[store]
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = train(tiny_overrides(shards, run_dir, **{"tracking.uri": uri, "tracking.start_timeout_s": 2,
                                                      "tracking.required": True}),
                   env={"MLFLOW_HTTP_REQUEST_TIMEOUT": "3"})
    one_line_error(result, wants, "tracking.required=true, so the run stops")
    # Bounded by the start timeout plus one request's timeout (and the seconds Python and torch take to start);
    # a URI that can never work is not retried at all.
    assert time.monotonic() - started < 40
    assert not list(run_dir.glob("ckpt-*"))


# Data: shards and samples that cannot be used.


def copy_of_domain_a(shards: dict[str, str], tmp_path: Path) -> Path:
    """A folder holding a copy of domain A's good shards, for a test to add or break shards beside them."""
    folder = tmp_path / "trainA"
    folder.mkdir()
    for path in glob.glob(shards["trainA"]):
        shutil.copy(path, folder)
    return folder


@pytest.fixture
def bad_shards(shards, tmp_path) -> Path:
    """The good shards of domain A beside an empty one, a truncated one and one that is not a tar."""
    folder = copy_of_domain_a(shards, tmp_path)
    good = sorted(glob.glob(shards["trainA"]))
    (folder / "x-empty.tar").write_bytes(b"")
    with tarfile.open(good[0]) as tar:
        cut = tar.getmembers()[4].offset_data + 10  # Inside a member's bytes, as an interrupted copy ends.
    (folder / "x-truncated.tar").write_bytes(Path(good[0]).read_bytes()[:cut])
    (folder / "x-not-a-tar.tar").write_bytes(b"<html>404 Not Found</html>" * 40)
    return folder


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_shards_among_good_ones_are_skipped_with_a_warning_naming_each(shards, tmp_path, bad_shards, workers):
    run_dir = tmp_path / "run"
    result = train(offline(shards, run_dir, **{"data.train_a": f"{bad_shards}/*.tar", "data.workers": workers,
                                               "train.steps": 100, "checkpoint.every_steps": 50}))
    trained(result)
    for name, why in (("x-empty.tar", "an empty file (0 bytes: an interrupted copy?)"),
                      ("x-truncated.tar", "truncated (unexpected end of data)"),
                      ("x-not-a-tar.tar", "not a tar file (invalid header)")):
        warned = [line for line in result.stderr.splitlines() if f"skipping shard {bad_shards / name}" in line]
        assert len(warned) == 1 and why in warned[0], result.stderr[-3000:]  # Once per job, not per worker.
    summary = [line for line in result.stderr.splitlines() if "its first pass read" in line]
    assert summary and "3 shard(s) skipped" in summary[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_domain_with_nothing_usable_stops_listing_what_was_skipped(shards, tmp_path, workers):
    folder = tmp_path / "trainB"
    folder.mkdir()
    (folder / "a.tar").write_bytes(b"")
    tar_of(folder / "b.tar", {"s1.txt": b"a caption", "s2.png": b"not a png"})
    result = train(offline(shards, tmp_path / "run", **{"data.train_b": f"{folder}/*.tar", "data.workers": workers}))
    # Found at start (b.tar's s2 has an image member by name) or on the first pass in a worker (its bytes): the
    # same one line either way, never a worker's traceback.
    one_line_error(result, f"domain B: shard pattern '{folder}/*.tar'", "no usable sample", f"{folder}/a.tar")
    assert not list((tmp_path / "run").glob("ckpt-*"))


@pytest.mark.parametrize("workers", [0, 2])
def test_samples_that_are_not_usable_images_are_skipped_and_counted(shards, tmp_path, workers):
    folder = copy_of_domain_a(shards, tmp_path)
    good = png(Image.new("RGB", (40, 40), (200, 30, 30)))
    tar_of(folder / "odd.tar", {
        "caption.txt": b"a sample with no image",
        "fake.png": b"text saved as .png",
        "bomb.png": png(Image.new("1", (20000, 20000))),  # 48 kB that would decode to 400 megapixels.
        "cut.png": good[: len(good) // 2],  # The header opens, the pixels do not.
        "gray.png": png(Image.new("L", (40, 40), 128)),  # Other 8-bit modes are converted to RGB and used.
        "palette.png": png(Image.new("RGB", (40, 40), (0, 90, 200)).convert("P")),
        "alpha.png": png(Image.new("RGBA", (40, 40), (10, 200, 10, 128))),
    })
    result = train(offline(shards, tmp_path / "run", **{"data.train_a": f"{folder}/*.tar", "data.workers": workers,
                                                       "train.steps": 100, "checkpoint.every_steps": 50}))
    trained(result)
    summary = [line for line in result.stderr.splitlines() if "its first pass read" in line][0]
    # 48 + gray, palette, alpha and cut: its header is sound, so only decoding finds it out (and skips it).
    assert "its first pass read 52 usable sample(s)" in summary
    for what in ("as no image member", "as not an image", "as too large to decode safely"):
        assert f"1 sample(s) skipped {what}: {folder}/odd.tar:" in summary, summary
    assert "data.max_image_pixels" in result.stderr
    assert "skipping sample" in result.stderr and "cut: undecodable" in result.stderr
    # Grayscale in an RGB domain is used, and counted as a conversion.
    assert "grayscale images in a colour set (replicated)" in result.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_a_16_bit_image_in_an_8_bit_domain_stops_the_run_in_one_line_naming_it(shards, tmp_path, workers):
    """It used to be skipped; read as 8 bits it would be clipped, so the domain's depth is what to change."""
    folder = copy_of_domain_a(shards, tmp_path)
    wide = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    tar_of(folder / "deep.tar", {"deep.png": png(Image.fromarray(wide))})
    result = train(offline(shards, tmp_path / "run", **{"data.train_a": f"{folder}/*.tar", "data.workers": workers,
                                                       "train.steps": 300, "checkpoint.every_steps": 0}))
    # Met in the first pass over the 49 samples (each worker's stream reads every shard), before the run ends.
    one_line_error(result, "deep.tar:deep", "mode I;16", "data.domain_a.depth=uint16", "would clip")


def test_a_shard_that_vanishes_or_is_emptied_mid_run_is_skipped_and_training_goes_on(shards, tmp_path):
    folder = copy_of_domain_a(shards, tmp_path)
    run_dir = tmp_path / "run"
    overrides = offline(shards, run_dir, **{"data.train_a": f"{folder}/*.tar", "data.workers": 2,
                                            "train.steps": 100000, "report.log_every_steps": 5,
                                            "report.sample_every_steps": 0, "checkpoint.every_steps": 0})
    proc = subprocess.Popen(train_cmd(0, overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=process_env(), cwd=ROOT)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text(),
                 what="the first logged step")
        shards_now = sorted(folder.glob("*.tar"))
        shards_now[0].unlink()  # Deleted by someone tidying up.
        shards_now[1].write_bytes(b"")  # Overwritten by a copy that has just begun.
        wait_for(lambda: len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 30, what="60 more steps")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 3, err[-3000:]  # Stopped by the signal, with its checkpoint.
    assert "Traceback" not in err
    assert f"skipping shard {shards_now[0]}" in err and "no longer exists" in err
    emptied = next(line for line in err.splitlines() if f"skipping shard {shards_now[1]}" in line)
    assert "an empty file" in emptied or "truncated" in emptied  # Empty if reopened, cut short if being read.
    assert list(run_dir.glob("ckpt-*/.metadata"))


def test_remote_shards_that_are_missing_empty_or_not_tars_are_skipped_and_a_remote_domain_of_nothing_stops(
        shards, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for path in glob.glob(shards["trainB"]):
        shutil.copy(path, served)
    (served / "empty.tar").write_bytes(b"")
    (served / "page.tar").write_bytes(b"<html>an error page</html>" * 40)
    names = ",".join([Path(p).stem for p in sorted(glob.glob(shards["trainB"]))] + ["empty", "page", "gone"])
    server = Server(served)
    try:
        result = train(offline(shards, tmp_path / "run", **{"data.train_b": f"{server.url}/{{{names}}}.tar",
                                                            "data.workers": 2, "train.steps": 120}))
        trained(result)
        for name, why in (("empty", "an empty file"), ("page", "not a tar file"),
                          ("gone", "the server answers HTTP 404")):
            assert f"skipping shard {server.url}/{name}.tar" in result.stderr and why in result.stderr, \
                result.stderr[-3000:]
        nothing = train(offline(shards, tmp_path / "run2", **{"data.train_b": f"{server.url}/{{empty,page,gone}}.tar",
                                                             "data.workers": 2}))
        one_line_error(nothing, "domain B", "no usable sample", f"{server.url}/gone.tar")
    finally:
        server.close()


# Mistakes in the files a user writes: exit 2, one line naming the key or file and the fix, nothing changed.


def yaml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


def images_folder(folder: Path) -> list[str]:
    """A folder of images given where shards are expected."""
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "a.png")
    return [f"data.train_a={folder}"]


def record_blocked(run_dir: Path) -> list[str]:
    """A run directory where the run's record cannot be written (a folder where metrics.jsonl goes)."""
    (run_dir / "metrics.jsonl").mkdir(parents=True)
    return [f"run_dir={run_dir}"]


MISTAKES = {
    "yaml syntax": (lambda t: ["--config", yaml_file(t, "train:\n  steps: 10\n   seed: 3\n")],
                    ["mine.yaml:3:8: not valid YAML", "mapping values are not allowed"]),
    "config file is a folder": (lambda t: ["--config", str(t)], ["is a folder: give a YAML file"]),
    "config file missing": (lambda t: ["--config", str(t / "nope.yaml")], ["does not exist"]),
    "unknown key": (lambda t: ["train.step=5"], ["unknown config key 'train.step'", "train.steps"]),
    "wrong type": (lambda t: ["train.steps=many"], ["train.steps"]),
    "unknown choice": (lambda t: ["model.norm=batchnorm"], ["did you mean 'batch'?", "instance, batch"]),
    "negative rate": (lambda t: ["optim.lr=-0.001"], ["'optim.lr' must be >= 0"]),
    "zero batch": (lambda t: ["data.batch_per_rank=0"], ["'data.batch_per_rank' must be positive"]),
    "beta out of range": (lambda t: ["optim.beta1=1.5"], ["'optim.beta1' must lie in [0, 1)"]),
    "crop larger than load": (lambda t: ["data.crop_size=64", "data.load_size=36"],
                              ["data.load_size (36) is smaller than data.crop_size (64)"]),
    "crop not a multiple": (lambda t: ["data.crop_size=30"], ["data.crop_size=30 is not a multiple of 4", "use 28"]),
    "batch larger than a domain": (lambda t: ["data.batch_per_rank=1000"],
                                   ["holds 48 sample(s), fewer than one batch", "data.batch_per_rank=1000"]),
    "override not yaml": (lambda t: ["train.steps=[1"], ["command-line override 'train.steps=[1'"]),
    "held-out set missing": (lambda t: [f"data.test_a={t}/nope/*.tar"], ["data.test_a=", "matches no file"]),
    "features file missing": (lambda t: [f"eval.features={t}/inception.pt"], ["eval.features=", "is not a file"]),
    "features path is a folder": (lambda t: [f"eval.features={t}"], ["eval.features=", "is not a file"]),
    "shard folder without shards": (lambda t: [f"data.train_b={t}"], ["data.train_b=", "no shards (*.tar)"]),
    "training shards missing": (lambda t: [f"data.train_a={t}/nope/*.tar"], ["data.train_a=", "matches no file"]),
    "folder of images": (lambda t: images_folder(t / "photos"),
                         ["is a folder of images", "python -m pipeline.shards"]),
    "checkpoint of another model": (lambda t: ["model.ngf=8"],
                                    ["was trained with another architecture", "model.ngf: checkpoint 4, config 8"]),
    "run_dir is a file": (lambda t: [f"run_dir={t / 'afile'}"], ["is a file, not a folder"]),
    "run_dir cannot be created": (lambda t: [f"run_dir={t / 'afile' / 'run'}"],
                                  ["cannot be created (Not a directory)", "choose a folder you can write to"]),
    "run record unwritable": (lambda t: record_blocked(t / "odd"), ["cannot write the run's record", "metrics.jsonl"]),
    "init_from missing": (lambda t: ["checkpoint.resume=never", f"checkpoint.init_from={t}/nope"],
                          ["has no latest_net_G_A.pth"]),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_mistakes_in_files_the_user_writes_exit_2_in_one_line_and_change_nothing(shards, finished, tmp_path,
                                                                                 mistake):
    (tmp_path / "afile").write_text("not a folder")
    make, phrases = MISTAKES[mistake]
    before = digest(finished)
    result = train([*offline(shards, finished), *make(tmp_path)])
    one_line_error(result, *phrases)
    assert digest(finished) == before


def test_debug_setting_shows_the_traceback_behind_the_line(shards, finished):
    result = train([*offline(shards, finished), "optim.lr=-1"], env={"PIPELINE_DEBUG": "1"})
    assert result.returncode == 2 and "Traceback" in result.stderr and "must be >= 0" in result.stderr


def test_every_row_of_the_readme_table_names_tests_that_exist():
    """The README's "When things go wrong" table is the promise: each row names at least one test, and each named
    test (and parameter id of this file's mistakes) exists."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## When things go wrong", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| accident")
            and not line.startswith("| ---")]
    assert len(rows) >= 25
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        refs = re.findall(r"`([^`]+)`", cell)
        assert refs, f"a row without a test: {row[:80]}"
        for ref in refs:
            file, name = ref.split("::")
            source = (ROOT / "tests" / ("test_accidents.py" if file == "acc" else file)).read_text()
            function, _, params = name.partition("[")
            if function.endswith("..."):
                assert any(d.startswith(function[:-3]) for d in re.findall(r"def (test_\w+)", source)), ref
            else:
                assert f"def {function}(" in source, ref
            if function.startswith("test_mistakes_") and params:
                assert set(params.rstrip("]").split(", ")) <= set(MISTAKES), ref


def test_a_truncated_newest_checkpoint_is_skipped_with_a_warning_and_the_one_before_resumes(shards, finished,
                                                                                           tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    newest = max(run_dir.glob("ckpt-*"))
    data = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # A copy or a write cut short.
    result = train(offline(shards, run_dir, **{"train.steps": 8}))
    trained(result)
    before = max(p for p in run_dir.glob("ckpt-*") if p != newest and p.name < newest.name)
    assert str(newest) in result.stderr and f"resumed from {before}" in result.stderr


# The other commands: translate.


def test_translate_skips_an_unreadable_shard_and_names_an_output_that_is_a_file(shards, finished, tmp_path):
    checkpoint = max(finished.glob("ckpt-*"))
    mixed = tmp_path / "testA"
    mixed.mkdir()
    for path in glob.glob(shards["testA"]):
        shutil.copy(path, mixed)
    (mixed / "zz-empty.tar").write_bytes(b"")
    translate = [sys.executable, "-m", "pipeline.translate", "--checkpoint", str(checkpoint), "--input", str(mixed)]
    done = subprocess.run([*translate, "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=TIMEOUT, env=process_env(), cwd=ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"skipping shard {mixed / 'zz-empty.tar'}: an empty file" in done.stderr
    assert "8 images translated" in done.stdout and "1 unreadable skipped" in done.stdout
    (tmp_path / "afile").write_text("")
    refused = subprocess.run([*translate, "--output", str(tmp_path / "afile")], capture_output=True, text=True,
                             timeout=TIMEOUT, env=process_env(), cwd=ROOT)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"error: '{tmp_path / 'afile'}' is not a folder" in refused.stderr
