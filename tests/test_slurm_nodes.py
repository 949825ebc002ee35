"""launch.slurm on a real 2-node Slurm cluster: two hosts (network namespaces with their own addresses and
hostnames, tests/support/hosts.py), slurmctld on the first, one `slurmd -N <host>` on each, jobs through
Submitit, sbatch and srun across both. The launcher runs on the first host, as on a login node.

2 x 1 and 2 x 2 jobs train in one process group across the hosts (equal, bit for bit, to 2 ranks on one host); a
preempted 2-node job requeues and resumes on both nodes; a node that dies ends the job on the other within
dist.timeout_s, naming it, and the same command resumes once the node is back.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.hosts import Hosts
from support.hosts import missing_requirements as hosts_missing
from support.runs import ROOT, nets_equal, process_env, tiny_overrides, train_cmd
from support.slurm_cluster import ClusterError, SlurmCluster, missing_requirements

from pipeline.engine.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def two_nodes():
    why = missing_requirements() or hosts_missing()
    if why:
        pytest.fail(why, pytrace=False)
    with Hosts() as hosts:
        # A node whose slurmd is gone is declared down after SlurmdTimeout; ReturnToService=2 takes it back when
        # its slurmd registers again.
        cluster = SlurmCluster(hosts=hosts, extra_conf=["SlurmdTimeout=10"])
        try:
            cluster.start()
        except ClusterError as err:
            cluster.cleanup()
            pytest.fail(f"could not start the 2-node Slurm cluster: {err}", pytrace=False)
        yield hosts, cluster
        cluster.stop()
        cluster.cleanup()


def client_env(cluster: SlurmCluster) -> dict[str, str]:
    """This checkout importable, and this cluster's SLURM_CONF and PATH: the one-node cluster of
    tests/test_slurm.py may have set its own in this process's environment (same pytest worker)."""
    return {**process_env(), "SLURM_CONF": cluster.env["SLURM_CONF"], "PATH": cluster.env["PATH"]}


def submit(cluster: SlurmCluster, *args: str) -> tuple[str, subprocess.CompletedProcess]:
    """`python -m launch.slurm ARGS` on the first host; the job id."""
    proc = subprocess.run(cluster.command([sys.executable, "-m", "launch.slurm", "--slurm-config", "ci", *args]),
                          env=client_env(cluster), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.search(r"Submitted Slurm job (\d+)", proc.stdout).group(1), proc


def log_text(run_dir: Path, job_id: str, task: int = 0) -> str:
    paths = [run_dir / "submitit" / f"{job_id}_{task}_log.{ext}" for ext in ("out", "err")]
    return "".join(p.read_text(errors="replace") if p.exists() else "" for p in paths)


def wait_for(cluster: SlurmCluster, job_id: str, run_dir: Path, ready, what: str, timeout_s: float) -> dict:
    ok, info = cluster.wait_for_job(job_id, ready, timeout_s)
    if ok:
        return info
    pytest.fail(f"job {job_id} not {what} within {timeout_s:.0f} s: {info.get('JobState')} ({info.get('Reason')})\n"
                f"--- task 0\n{log_text(run_dir, job_id)[-3000:]}\n--- task 1\n"
                f"{log_text(run_dir, job_id, 1)[-2000:]}\n--- cluster\n{cluster.logs_tail()}")


def completed(info: dict) -> bool:
    if info.get("JobState") in ("FAILED", "NODE_FAIL", "CANCELLED", "TIMEOUT"):
        pytest.fail(f"job ended {info.get('JobState')}", pytrace=False)
    return info.get("JobState") == "COMPLETED"


def training(run_dir: Path):
    metrics = run_dir / "metrics.jsonl"
    return lambda info: metrics.exists() and metrics.stat().st_size > 0


def overrides(shards, run_dir: Path, **extra) -> list[str]:
    return tiny_overrides(shards, run_dir, **{"tracking.uri": f"sqlite:///{run_dir.parent / 'mlflow.db'}",
                                              "report.sample_every_steps": 0, **extra})


def lr_steps(run_dir: Path) -> tuple[object, list[int]]:
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0], [m.step for m in client.get_metric_history(runs[0].info.run_id, "lr")]


def test_a_2_node_job_equals_2_ranks_on_one_host_and_reports_both_hosts(two_nodes, shards, tmp_path):
    hosts, cluster = two_nodes
    common = {"train.steps": 6, "checkpoint.every_steps": 6, "report.log_every_steps": 2}
    run_dir = tmp_path / "nodes" / "run"
    job_id, proc = submit(cluster, "slurm.nodes=2", "slurm.tasks_per_node=1", *overrides(shards, run_dir, **common))
    assert "SQLite's locking is unreliable" in proc.stderr  # The launcher warned before submitting.
    info = wait_for(cluster, job_id, run_dir, completed, "COMPLETED", 150)
    assert info["NumNodes"] == "2" and info["NodeList"] == "h[1-2]"
    log = log_text(run_dir, job_id)
    assert f"ranks: 0 on h1 ({hosts.addr('h1')}), 1 on h2 ({hosts.addr('h2')})" in log, log[-3000:]
    assert "interface eth0" in log

    one = subprocess.run(train_cmd(2, overrides(shards, tmp_path / "one" / "run", **common)), env=process_env(),
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(run_dir / "ckpt-000000006")
    b = load_checkpoint(tmp_path / "one" / "run" / "ckpt-000000006")
    assert nets_equal(a, b)
    run, steps = lr_steps(run_dir)
    assert run.info.status == "FINISHED" and steps == [2, 4, 6] and run.data.tags["world_size"] == "2"


def test_a_2_x_2_job_puts_two_ranks_on_each_host(two_nodes, shards, tmp_path):
    hosts, cluster = two_nodes
    run_dir = tmp_path / "run"
    job_id, _ = submit(cluster, "slurm.nodes=2", "slurm.tasks_per_node=2",
                       *overrides(shards, run_dir, **{"train.steps": 4, "checkpoint.every_steps": 4}))
    wait_for(cluster, job_id, run_dir, completed, "COMPLETED", 180)
    a1, a2 = hosts.addr("h1"), hosts.addr("h2")
    assert f"ranks: 0 on h1 ({a1}), 1 on h1 ({a1}), 2 on h2 ({a2}), 3 on h2 ({a2})" in log_text(run_dir, job_id)
    state = load_checkpoint(run_dir / "ckpt-000000004")
    assert state["world_size"] == 4 and len(state["ranks"]) == 4


def test_a_preempted_2_node_job_requeues_and_resumes_on_both_nodes(two_nodes, shards, tmp_path):
    hosts, cluster = two_nodes
    run_dir, total, log_every = tmp_path / "run", 150, 10
    job_id, _ = submit(cluster, "slurm.nodes=2", "slurm.tasks_per_node=1", *overrides(
        shards, run_dir, **{"train.steps": total, "report.log_every_steps": log_every, "checkpoint.every_steps": 50}))
    wait_for(cluster, job_id, run_dir, training(run_dir), "training", 120)
    # Both CPUs of both nodes, in the higher-priority partition: Slurm preempts ours (SIGTERM to every task).
    urgent = cluster.run("sbatch", "--parsable", "--partition=urgent", "--nodes=2", "--ntasks-per-node=2",
                         "--mem=100M", f"--output={tmp_path / 'urgent.out'}", "--wrap=sleep 1").strip()
    wait_for(cluster, job_id, run_dir, lambda i: i.get("JobState") == "PENDING" and i.get("Restarts") == "1",
             "requeued", 90)
    wait_for(cluster, urgent, tmp_path, lambda i: i.get("JobState") == "COMPLETED", "urgent COMPLETED", 60)
    time.sleep(2)  # slurmd refuses a credential issued in the second of the last attempt's revocation.
    cluster.scontrol("update", f"JobId={job_id}", "StartTime=now")
    wait_for(cluster, job_id, run_dir, completed, "COMPLETED after the requeue", 150)
    logs = [log_text(run_dir, job_id, task) for task in (0, 1)]
    stops = [re.findall(r"stopped after step (\d+) \(signal\)", text) for text in logs]
    assert stops[0] and stops[0] == stops[1], stops  # Both nodes stopped after the same step.
    assert f"resuming at step {stops[0][0]}:" in logs[0]
    run, steps = lr_steps(run_dir)
    assert run.info.status == "FINISHED" and steps == list(range(log_every, total + 1, log_every))
    assert load_checkpoint(list_checkpoints(run_dir)[-1][1])["step"] == total


def job_processes(hosts: Hosts, name: str) -> list[str]:
    out = []
    for pid in hosts.pids(name):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except FileNotFoundError:
            continue
        if "submitit" in cmd or "pipeline.train" in cmd:
            out.append(cmd)
    return out


def test_a_node_that_dies_ends_the_attempt_naming_it_and_the_requeued_job_resumes(two_nodes, shards, tmp_path):
    """Every process of host 2 (its slurmd and the task) gets SIGKILL. The rank on host 1 stops within
    dist.timeout_s, naming the lost rank and host; Slurm declares the node down (SlurmdTimeout) and, the job
    being submitted with --requeue, requeues it; once the node is back the job resumes from its checkpoint."""
    hosts, cluster = two_nodes
    run_dir, total, timeout_s = tmp_path / "run", 400, 15
    job_id, _ = submit(cluster, "slurm.nodes=2", "slurm.tasks_per_node=1", *overrides(shards, run_dir, **{
        "train.steps": total, "report.log_every_steps": 10, "checkpoint.every_steps": 20,
        "dist.timeout_s": timeout_s}))
    wait_for(cluster, job_id, run_dir, lambda i: bool(list_checkpoints(run_dir)), "a first checkpoint", 150)
    t0 = time.monotonic()
    assert hosts.kill_host("h2") >= 2  # slurmd and the task: the machine is gone.
    while any("pipeline" in cmd or "submitit" in cmd for cmd in job_processes(hosts, "h1")):
        assert time.monotonic() - t0 < timeout_s + 60, job_processes(hosts, "h1")
        time.sleep(0.3)
    stopped_s = time.monotonic() - t0
    log = log_text(run_dir, job_id)
    assert f"lost contact with rank 1 on host h2 ({hosts.addr('h2')})" in log, log[-4000:]
    info = wait_for(cluster, job_id, run_dir, lambda i: i.get("JobState") == "PENDING" and i.get("Restarts") == "1",
                    "requeued after the node failure", 60)
    assert stopped_s < timeout_s + 60, stopped_s
    done = list_checkpoints(run_dir)[-1][0]
    assert 0 < done < total and info["JobState"] == "PENDING"

    cluster.start_slurmd("h2")  # The node comes back; Slurm returns it to service (ReturnToService=2).
    deadline = time.monotonic() + 60
    while "idle" not in cluster.run("sinfo", "-h", "-n", "h2", "-o", "%t", check=False):
        assert time.monotonic() < deadline, cluster.logs_tail()
        time.sleep(0.5)
    time.sleep(2)
    cluster.scontrol("update", f"JobId={job_id}", "StartTime=now")
    wait_for(cluster, job_id, run_dir, completed, "COMPLETED after the node came back", 180)
    assert f"resumed from {run_dir}/ckpt-{done:09d} (step {done})" in log_text(run_dir, job_id)
    assert load_checkpoint(list_checkpoints(run_dir)[-1][1])["step"] == total
    run, steps = lr_steps(run_dir)
    assert run.info.status == "FINISHED" and steps == list(range(10, total + 1, 10))


def test_the_first_nodes_address_comes_from_slurm_where_its_name_does_not_resolve(two_nodes):
    hosts, cluster = two_nodes
    probe = ("from launch.slurm import master_address; "
             "print(master_address('h2'), master_address('no-such-node-name'))")
    out = subprocess.run(cluster.command([sys.executable, "-c", probe]), env=client_env(cluster),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["h2", "no-such-node-name"]  # Resolvable: kept; unknown to Slurm too: kept.
    probe = "from launch.slurm import _slurm_node_addr; print(_slurm_node_addr('h2'))"
    out = subprocess.run(cluster.command([sys.executable, "-c", probe]), env=client_env(cluster),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == hosts.addr("h2"), out.stderr
