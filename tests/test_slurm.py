"""launch.slurm and launch.sweep against a real one-node Slurm cluster that this module starts on 127.0.0.1.

No mock of sbatch or srun: jobs go through Submitit, sbatch, slurmctld, slurmd and srun and train with gloo on
CPU. Slurm itself stops them: a real preemption (a job in a higher-priority partition; SIGTERM), the warning
before the time limit (--signal, USR2) and scancel. Without the Slurm packages (or root) these tests fail and say
how to install them: they never skip. The cluster (tests/support/slurm_cluster.py) lives for the session.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from mlflow import MlflowClient
from support.runs import ROOT, tiny_overrides
from support.slurm_cluster import ClusterError, SlurmCluster, missing_requirements

from launch import slurm as launch_slurm
from launch import sweep as launch_sweep
from pipeline.engine.checkpoint import list_checkpoints, load_checkpoint

# One cluster for the session: `make test` runs whole files per pytest worker (--dist loadfile).
pytestmark = pytest.mark.slow

BAD_END = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="session")
def cluster():
    why = missing_requirements()
    if why:
        pytest.fail(why, pytrace=False)
    c = SlurmCluster()
    try:
        c.start()
    except ClusterError as err:
        c.cleanup()
        pytest.fail(f"could not start the Slurm test cluster: {err}", pytrace=False)
    c.activate()  # Submitit runs sbatch and sacct from this process's environment; jobs inherit it.
    yield c
    c.deactivate()
    c.stop()
    c.cleanup()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow sqlite store for these tests: creating its tables costs seconds, once."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('slurm-mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def overrides(shards, run_dir: Path, uri: str, experiment: str, **extra) -> list[str]:
    return tiny_overrides(shards, run_dir, **{"tracking.uri": uri, "tracking.experiment": experiment, **extra})


def log_text(folder: Path, job_id: str, task: int = 0) -> str:
    """A task's stdout (Submitit's INFO lines) and stderr (the trainer's log, warnings)."""
    paths = [folder / f"{job_id}_{task}_log.{ext}" for ext in ("out", "err")]
    return "".join(p.read_text(errors="replace") if p.exists() else f"(no log {p})\n" for p in paths)


def wait_for_job(cluster: SlurmCluster, job_id: str, folder: Path, ready, what: str, timeout_s: float) -> dict:
    """Poll `scontrol show job` until `ready(info)`; fail with the job's state and logs otherwise."""
    ok, info = cluster.wait_for_job(job_id, ready, timeout_s, give_up=frozenset(BAD_END))
    if ok:
        return info
    pytest.fail(f"job {job_id} did not reach '{what}' within {timeout_s:.0f} s: {info.get('JobState')} "
                f"({info.get('Reason')})\n--- rank 0 log\n{log_text(folder, job_id)[-4000:]}\n"
                f"--- rank 1 log\n{log_text(folder, job_id, 1)[-2000:]}\n--- cluster\n{cluster.logs_tail()}")


def completed(info: dict) -> bool:
    return info.get("JobState") == "COMPLETED"


def requeued(info: dict) -> bool:
    if info.get("JobState") == "COMPLETED":
        pytest.fail("the job completed without being stopped: it trained faster than this test assumes (raise "
                    "train.steps)", pytrace=False)
    return info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) >= 1


def release(cluster: SlurmCluster, job_id: str, *updates: str) -> None:
    """Start a requeued job now instead of after Slurm's ~2 min hold. Not within the second of its requeue:
    slurmd refuses a credential issued in the same second as the last attempt's revocation (the job FAILs with
    "Job credential revoked")."""
    time.sleep(2)
    cluster.scontrol("update", f"JobId={job_id}", "StartTime=now", *updates)


def wait_for_training(run_dir: Path, cluster: SlurmCluster, job_id: str, folder: Path, timeout_s: float = 90):
    """Until the first metrics line: the job is past its start-up and inside the training loop."""
    metrics = run_dir / "metrics.jsonl"
    wait_for_job(cluster, job_id, folder, lambda info: metrics.exists() and metrics.stat().st_size > 0,
                 "training", timeout_s)


def lr_steps(uri: str, experiment: str) -> tuple[object, list[int]]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0], [m.step for m in client.get_metric_history(runs[0].info.run_id, "lr")]


def check_stopped_and_resumed(folder: Path, job_id: str, run_dir: Path, uri: str, experiment: str, total: int,
                              log_every: int, signal_name: str) -> None:
    """Both ranks stopped after the same step on the signal; the requeued job resumed there and finished."""
    logs = [log_text(folder, job_id, task) for task in (0, 1)]
    stops = [re.findall(r"stopped after step (\d+) \(signal\)", text) for text in logs]
    assert stops[0] and stops[0] == stops[1], stops  # One stop, at the same step on both ranks.
    stop_step = int(stops[0][0])
    assert 0 < stop_step < total
    for text in logs:
        assert f"received {signal_name}" in text
    assert "Calling checkpoint method" in logs[0] and f"Requeued job {job_id}" in logs[0]
    assert f"resuming at step {stop_step}:" in logs[0]
    # The MLflow run went on: one run, one point per logged step, none missing or repeated.
    run, steps = lr_steps(uri, experiment)
    assert run.info.status == "FINISHED"
    assert steps == list(range(log_every, total + 1, log_every))
    assert run.data.tags["slurm_job_id"] == job_id
    # The run ends at the full step count, with both ranks' state in the checkpoint.
    last_step, last = list_checkpoints(run_dir)[-1]
    state = load_checkpoint(last)
    assert last_step == total and state["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["mlflow_run_id"] == run.info.run_id


@pytest.mark.parametrize("nodes,uri,warned", [(2, "sqlite", True), (1, "sqlite", False), (2, "http", False)])
def test_multi_node_jobs_recording_to_sqlite_are_warned_before_submission(shards, tmp_path, nodes, uri, warned):
    extra = {} if uri == "sqlite" else {"tracking.uri": "http://tracking.example:5000"}
    args = ["--slurm-config", "example_gpu", f"slurm.nodes={nodes}", "--dry-run",
            *tiny_overrides(shards, tmp_path / "run", **extra)]
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ("SQLite's locking is unreliable" in proc.stderr) == warned
    if warned:
        assert f"mlflow server --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in proc.stderr
        assert "tracking.uri=http://<that host>:5000" in proc.stderr


def test_dry_run_shows_nodes_tasks_gpus_cpus_signal_and_requeue(shards, tmp_path):
    args = ["--slurm-config", "example_gpu", "slurm.nodes=2", "slurm.cpus_per_task=6", "slurm.partition=big",
            "slurm.time_min=240", "slurm.signal_delay_s=150", "slurm.max_num_timeout=7", "--dry-run",
            *tiny_overrides(shards, tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --signal=USR2@150", "#SBATCH --requeue",
                 "#SBATCH --partition=big", "#SBATCH --time=240", "#SBATCH --mem=480GB", "#SBATCH --exclusive"):
        assert line in out.splitlines(), line
    assert "srun --unbuffered" in out and "--cpus-per-task=6" in out.split("srun", 1)[1]
    assert "2 node(s) x 8 task(s) per node = 16 rank(s)" in out
    assert "at most 7 time-outs" in out and "module load" in out
    assert not (tmp_path / "run").exists()  # Nothing was submitted or written.


def test_typos_fail_before_anything_is_submitted(cluster, shards, tmp_path, capsys):
    base = ["--slurm-config", "ci", *tiny_overrides(shards, tmp_path / "run")]
    assert launch_slurm.main([*base, "slurm.gpus_per_nod=1"]) == 2
    assert "did you mean 'slurm.gpus_per_node'?" in capsys.readouterr().err
    assert launch_slurm.main([*base, "train.stepz=5"]) == 2
    assert "did you mean 'train.steps'?" in capsys.readouterr().err
    assert launch_slurm.main([*base, "slurm.tasks_per_node=3", "slurm.gpus_per_node=2"]) == 2
    assert "one task per GPU" in capsys.readouterr().err
    assert launch_sweep.main([*base, "--grid", "optim.lrr=[1,2]"]) == 2
    assert "did you mean 'optim.lr'?" in capsys.readouterr().err
    assert cluster.squeue() == []


@pytest.mark.parametrize("method", ["cyclegan", "fastcut"])
def test_two_task_job_trains_in_one_process_group(cluster, shards, tmp_path, tracking_uri, method):
    run_dir = tmp_path / "run"
    experiment = "two_tasks" if method == "cyclegan" else f"two_tasks_{method}"
    args = ["--slurm-config", "ci", "slurm.tasks_per_node=2",
            *overrides(shards, run_dir, tracking_uri, experiment, **{"model.method": method})]
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"Submitted Slurm job (\d+)", proc.stdout).group(1)
    folder = run_dir / "submitit"
    assert f"{folder}/{job_id}_0_log.out" in proc.stdout and f"run dir: {run_dir}" in proc.stdout
    assert f"experiment '{experiment}', run 'run' at {tracking_uri}" in proc.stdout
    # What --dry-run shows is what was submitted.
    dry = launch_slurm.submit(["--dry-run", *args])
    assert (folder / f"{job_id}_submission.sh").read_text() == dry.script

    info = wait_for_job(cluster, job_id, folder, completed, "COMPLETED", 120)
    assert info["NumTasks"] == "2"
    results = submitit.SlurmJob(folder, job_id, tasks=(0, 1)).results()
    assert sorted(r.rank for r in results) == [0, 1] and {r.step for r in results} == {6}
    # Both ranks were in one process group: the checkpoint holds both ranks' state.
    steps = [step for step, _ in list_checkpoints(run_dir)]
    assert steps == [3, 6]
    state = load_checkpoint(run_dir / "ckpt-000000006")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert set(state["nets"]) == ({"G_ab", "G_ba", "D_a", "D_b"} if method == "cyclegan" else {"G", "F", "D"})
    run, lr = lr_steps(tracking_uri, experiment)
    assert run.info.status == "FINISHED" and lr == [2, 4, 6]
    assert run.data.tags["world_size"] == "2" and run.data.tags["slurm_job_id"] == job_id
    assert results[0].run_id == run.info.run_id == state["mlflow_run_id"]


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(cluster, shards, tmp_path, tracking_uri):
    run_dir, total, log_every = tmp_path / "run", 120, 10
    sub = launch_slurm.submit(["--slurm-config", "ci", "slurm.tasks_per_node=2", *overrides(
        shards, run_dir, tracking_uri, "preempted", **{"train.steps": total, "report.log_every_steps": log_every,
                                                      "checkpoint.every_steps": 50, "report.sample_every_steps": 60})])
    job_id, folder = sub.jobs[0].job_id, sub.folder
    wait_for_training(run_dir, cluster, job_id, folder)
    # A job in the higher-priority partition needs both CPUs: Slurm preempts ours, sending SIGCONT + SIGTERM to
    # every task (Submitit alone ignores SIGTERM). Slurm requeues a preempted job only if it still runs when
    # GraceTime ends; ours stops at a step boundary and requeues itself long before.
    urgent = cluster.run("sbatch", "--parsable", "--partition=urgent", "--ntasks=2", "--mem=100M",
                         f"--output={tmp_path / 'urgent.out'}", "--wrap=sleep 1").strip()
    wait_for_job(cluster, job_id, folder, requeued, "requeued (PENDING, Restarts=1)", 60)
    assert cluster.job(job_id)["Restarts"] == "1"
    wait_for_job(cluster, urgent, tmp_path, completed, "the urgent job COMPLETED", 60)
    release(cluster, job_id)
    wait_for_job(cluster, job_id, folder, completed, "COMPLETED after the requeue", 120)
    check_stopped_and_resumed(folder, job_id, run_dir, tracking_uri, "preempted", total, log_every, "SIGTERM")
    assert {r.step for r in sub.jobs[0].results()} == {total}


def test_cancelled_job_stops_with_a_checkpoint_and_is_not_requeued(cluster, shards, tmp_path, tracking_uri):
    run_dir = tmp_path / "run"
    sub = launch_slurm.submit(["--slurm-config", "ci", "slurm.tasks_per_node=2", *overrides(
        shards, run_dir, tracking_uri, "cancelled", **{"train.steps": 400, "report.log_every_steps": 10,
                                                      "checkpoint.every_steps": 200, "report.sample_every_steps": 0})])
    job_id, folder = sub.jobs[0].job_id, sub.folder
    wait_for_training(run_dir, cluster, job_id, folder)
    cluster.run("scancel", job_id)  # SIGTERM as for a preemption, but the user means it.
    wait_for_job(cluster, job_id, folder, lambda i: i.get("JobState") == "CANCELLED", "CANCELLED", 60)
    with pytest.raises(submitit.core.utils.FailedJobError, match="not requeued \\(the job was cancelled\\)"):
        sub.jobs[0].results()  # Rank 0 says so in its result.
    assert cluster.job(job_id)["JobState"] == "CANCELLED" and cluster.job(job_id)["Restarts"] == "0"
    stop_step = int(re.search(r"stopped after step (\d+) \(signal\)", log_text(folder, job_id)).group(1))
    assert [step for step, _ in list_checkpoints(run_dir)] == [stop_step]  # The run can be continued.
    assert lr_steps(tracking_uri, "cancelled")[0].info.status == "KILLED"


def test_job_at_its_time_limit_is_requeued_and_resumes_from_its_checkpoint(cluster, shards, tmp_path, tracking_uri):
    """Slurm's USR2 from --signal=USR2@55, sent by slurmctld's own time-limit check.

    Slurm's time limits are whole minutes and slurmctld checks them every 30 s. So the job starts with 10 minutes;
    once it trains, the test shortens its limit to 1 minute, which leaves less than the 55 s of the warning: the
    next check (at most 30 s later) sends USR2. The requeued job gets its 10 minutes back. The run is long
    enough (~45 s of steps on 2 cores) to be still training at that check.
    """
    run_dir, total, log_every = tmp_path / "run", 1000, 20
    sub = launch_slurm.submit(["--slurm-config", "ci", "slurm.tasks_per_node=2", "slurm.signal_delay_s=55", *overrides(
        shards, run_dir, tracking_uri, "time_limit", **{"train.steps": total, "report.log_every_steps": log_every,
                                                       "checkpoint.every_steps": 500, "report.sample_every_steps": 0})])
    job_id, folder = sub.jobs[0].job_id, sub.folder
    wait_for_training(run_dir, cluster, job_id, folder)
    cluster.scontrol("update", f"JobId={job_id}", "TimeLimit=1")
    wait_for_job(cluster, job_id, folder, requeued, "requeued after the time-limit warning", 75)
    assert "Job has timed out" in log_text(folder, job_id)  # Submitit counted it against max_num_timeout.
    release(cluster, job_id, "TimeLimit=10")
    wait_for_job(cluster, job_id, folder, completed, "COMPLETED after the requeue", 150)
    check_stopped_and_resumed(folder, job_id, run_dir, tracking_uri, "time_limit", total, log_every, "SIGUSR2")
    assert "9 remaining timeouts" in log_text(folder, job_id)


def test_sweep_runs_as_an_array_with_one_mlflow_run_per_element(cluster, shards, tmp_path, tracking_uri):
    sweep_dir = tmp_path / "sweep"
    args = ["--slurm-config", "ci", "--grid", "optim.lr=[1e-4,2e-4,3e-4]", "--grid", "loss.lambda_a=[5]",
            "--array-parallelism", "2", *overrides(shards, sweep_dir, tracking_uri, "sweep")]
    proc = subprocess.run([sys.executable, "-m", "launch.sweep", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    array_id = re.search(r"job array (\d+)", proc.stdout).group(1)
    folder = sweep_dir / "submitit"
    script = (folder / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%2" in script
    for index in range(3):
        wait_for_job(cluster, f"{array_id}_{index}", folder, completed, "COMPLETED", 150)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    by_lr = {float(r.data.params["optim.lr"]): r for r in runs}
    assert sorted(by_lr) == [1e-4, 2e-4, 3e-4] and len(runs) == 3
    names = ["00_lr=1e-4_lambda_a=5", "01_lr=2e-4_lambda_a=5", "02_lr=3e-4_lambda_a=5"]
    for name, lr in zip(names, [1e-4, 2e-4, 3e-4]):
        run = by_lr[lr]
        assert run.info.status == "FINISHED" and run.info.run_name == f"sweep/{name}"
        assert run.data.params["loss.lambda_a"] == "5.0"
        assert run.data.params["run_dir"] == str(sweep_dir / name)
        assert run.data.tags["slurm_job_id"] == array_id  # The array's id: the runs belong together.
        assert json.loads((sweep_dir / name / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6


def test_local_executor_runs_the_same_job_without_slurm(shards, tmp_path, tracking_uri):
    run_dir = tmp_path / "run"
    sub = launch_slurm.submit(["--slurm-config", "local", "slurm.tasks_per_node=2",
                               *overrides(shards, run_dir, tracking_uri, "local")])
    results = sub.jobs[0].results()
    assert sorted(r.rank for r in results) == [0, 1] and {r.step for r in results} == {6}
    state = load_checkpoint(run_dir / "ckpt-000000006")
    assert state["world_size"] == 2
    run, lr = lr_steps(tracking_uri, "local")
    assert run.info.status == "FINISHED" and lr == [2, 4, 6]


def test_grid_parsing_and_element_names():
    assert launch_sweep.parse_grid("optim.lr=[1e-4, 2e-4]") == ("optim.lr", ["1e-4", "2e-4"])
    assert launch_sweep.parse_grid("loss.gan_mode=lsgan,hinge") == ("loss.gan_mode", ["lsgan", "hinge"])
    assert launch_sweep.element_name(3, [("optim.lr", "1e-4"), ("data.train_a", "a/b*.tar")]) == \
        "03_lr=1e-4_train_a=a-b-.tar"


def test_master_port_is_below_the_ephemeral_range_and_new_for_each_attempt():
    """Submitit's port (20000-60000 by job id) lies in Linux's ephemeral range and repeats on a requeue."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {launch_slurm.master_port(str(job), attempt) for job in range(1, 200) for attempt in range(3)}
    assert max(ports) < min(low, 32768) and min(ports) >= 20000 and len(ports) > 500
    assert launch_slurm.master_port("7", 0) == launch_slurm.master_port("7", 0) != launch_slurm.master_port("7", 1)
