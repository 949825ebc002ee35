"""Two real hosts (network namespaces with their own addresses and hostnames, tests/support/hosts.py): torchrun
across them equals one host, a killed worker restarts the group on both, and a host that dies or goes silent
ends the job on the other within dist.timeout_s, naming what was lost; the same command then resumes."""

from __future__ import annotations

import glob
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.hosts import Hosts, missing_requirements
from support.runs import free_port, nets_equal, process_env, tiny_overrides, train_cmd

from pipeline.engine.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture
def hosts():
    why = missing_requirements()
    if why:
        pytest.fail(why)  # Never a skip: the message says what to install.
    with Hosts() as made:
        yield made


def torchrun_on(hosts: Hosts, overrides: list[str], cwd: Path, *agent_args: str) -> dict[str, subprocess.Popen]:
    """One torchrun agent per host (one rank each), c10d rendezvous at h1's address."""
    port = free_port()
    procs = {}
    for name in hosts.names:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={hosts.addr('h1')}:{port}", "--rdzv_id=hosts-test",
               *agent_args, "-m", "pipeline.train", *overrides]
        # Logs go to files: a pipe nobody reads while the agents run would fill and block them.
        with open(cwd / f"{name}-{port}.log", "w") as out:
            procs[name] = hosts.popen(name, cmd, env=process_env(), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        procs[name].log_path = cwd / f"{name}-{port}.log"
    return procs


def log_of(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def finish(procs: dict[str, subprocess.Popen], timeout: float = 240) -> dict[str, tuple[int, str]]:
    try:
        codes = {name: p.wait(timeout=timeout) for name, p in procs.items()}
    except subprocess.TimeoutExpired:
        raise AssertionError("agents did not finish:\n" + "\n".join(
            f"--- {name}\n{log_of(p)[-3000:]}" for name, p in procs.items())) from None
    return {name: (codes[name], log_of(p)) for name, p in procs.items()}


def wait_for_checkpoint(run_dir: Path, procs: dict[str, subprocess.Popen], timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not list_checkpoints(run_dir):
        assert all(p.poll() is None for p in procs.values()), "an agent ended before the first checkpoint"
        assert time.monotonic() - t0 < timeout, "no checkpoint in time"
        time.sleep(0.1)


def test_torchrun_across_two_hosts_equals_two_ranks_on_one_host(hosts, shards, tmp_path):
    common = {"train.steps": 6, "checkpoint.every_steps": 6, "report.sample_every_steps": 0}
    one = subprocess.run(train_cmd(2, tiny_overrides(shards, tmp_path / "one", **common)), env=process_env(),
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    results = finish(torchrun_on(hosts, tiny_overrides(shards, tmp_path / "two", **common), tmp_path))
    assert all(code == 0 for code, _ in results.values()), {h: log[-3000:] for h, (_, log) in results.items()}
    logs = "".join(log for _, log in results.values())
    # Rank 0's log lists every rank's host and address: two hosts, two addresses, each on its own interface.
    for name in hosts.names:
        assert f"on {name} ({hosts.addr(name)})" in logs, logs[-3000:]
    assert "interface eth0" in logs
    a = load_checkpoint(tmp_path / "one" / "ckpt-000000006")
    b = load_checkpoint(tmp_path / "two" / "ckpt-000000006")
    assert nets_equal(a, b)
    for ra, rb in zip(a["ranks"], b["ranks"]):
        assert torch.equal(ra["pool_a"]["images"], rb["pool_a"]["images"])


def worker_pid(hosts: Hosts, name: str) -> int:
    """The training process on host `name` (not its torchrun agent)."""
    for pid in hosts.pids(name):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"pipeline.train" in cmdline and b"torch.distributed.run" not in cmdline:
            return pid
    raise AssertionError(f"no training process on {name}")


def test_a_worker_killed_on_host_2_restarts_the_group_on_both_hosts(hosts, shards, tmp_path):
    import os
    import signal

    total = 120
    overrides = tiny_overrides(shards, tmp_path / "run", **{"train.steps": total, "checkpoint.every_steps": 20,
                                                            "report.log_every_steps": 5,
                                                            "report.sample_every_steps": 0})
    procs = torchrun_on(hosts, overrides, tmp_path, "--max-restarts=1")
    wait_for_checkpoint(tmp_path / "run", procs)
    os.kill(worker_pid(hosts, "h2"), signal.SIGKILL)
    results = finish(procs)
    assert all(code == 0 for code, _ in results.values()), {h: log[-3000:] for h, (_, log) in results.items()}
    assert "resumed from" in "".join(log for _, log in results.values())
    final = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])
    assert final["step"] == total and final["images_seen"] == 2 * total


@pytest.mark.parametrize("how", ["killed", "silent"])
def test_a_lost_host_ends_the_job_within_the_timeout_and_the_same_command_resumes(hosts, shards, tmp_path, how):
    """killed: every process of host 2 gets SIGKILL (its connections close); silent: its interface goes down
    (nothing closes: only dist.timeout_s ends the wait)."""
    timeout_s, total = 15, 300
    overrides = tiny_overrides(shards, tmp_path / "run", **{
        "train.steps": total, "checkpoint.every_steps": 20, "report.log_every_steps": 10,
        "report.sample_every_steps": 0, "dist.timeout_s": timeout_s})
    procs = torchrun_on(hosts, overrides, tmp_path)
    wait_for_checkpoint(tmp_path / "run", procs)
    t0 = time.monotonic()
    if how == "killed":
        assert hosts.kill_host("h2") >= 2  # The agent and its worker.
    else:
        hosts.interface_down("h2")
    code, log = procs["h1"].wait(timeout=timeout_s + 90), log_of(procs["h1"])
    elapsed = time.monotonic() - t0
    assert code != 0, log[-3000:]
    assert elapsed < timeout_s + 60, elapsed  # The timeout plus process exits, never torch's 30 minutes.
    if how == "killed":
        assert "lost contact with rank" in log and f"on host h2 ({hosts.addr('h2')})" in log, log[-4000:]
    else:
        assert f"no answer within dist.timeout_s={timeout_s} s; unreachable: rank" in log, log[-4000:]
        assert f"on host h2 ({hosts.addr('h2')})" in log
    assert "the same command resumes from the last checkpoint" in log
    assert hosts.pids("h1") == []  # The surviving host's agent and worker are gone, nothing hangs.
    done = list_checkpoints(tmp_path / "run")[-1][0]
    assert 0 < done < total

    hosts.kill_host("h2")  # A silent host's processes time out on their own; a restarted machine has none.
    hosts.close()
    with Hosts() as again:
        results = finish(torchrun_on(again, overrides, tmp_path))
    assert all(c == 0 for c, _ in results.values()), {h: log[-3000:] for h, (_, log) in results.items()}
    assert f"(step {done})" in "".join(log for _, log in results.values())
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1])["step"] == total


def http_pattern(hosts: Hosts, port: int, shards: dict[str, str], split: str) -> str:
    names = sorted(Path(p).name for p in glob.glob(shards[split]))
    return f"http://{hosts.addr('h1')}:{port}/{split}/{{{','.join(names)}}}"


def test_shards_served_from_host_1_train_on_host_2_and_a_server_gone_for_good_ends_the_run(hosts, shards,
                                                                                          tmp_path):
    root = Path(shards["trainA"]).parent.parent
    port = free_port()
    server = hosts.popen("h1", [sys.executable, "-m", "http.server", str(port), "--bind", hosts.addr("h1"),
                                "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    remote = {"data.train_a": http_pattern(hosts, port, shards, "trainA"),
              "data.train_b": http_pattern(hosts, port, shards, "trainB"),
              "tracking.enabled": False, "report.sample_every_steps": 0, "checkpoint.every_steps": 0}
    t0 = time.monotonic()
    while hosts.run("h2", [sys.executable, "-c", f"import socket; socket.create_connection(('{hosts.addr('h1')}', "
                                                 f"{port}), timeout=1)"], timeout=10).returncode != 0:
        assert time.monotonic() - t0 < 20, "the shard server did not start"
        time.sleep(0.2)
    ok = hosts.run("h2", train_cmd(0, tiny_overrides(shards, tmp_path / "ok", **remote, **{"train.steps": 60})),
                   timeout=180, env=process_env(), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "retrying" not in ok.stderr  # 60 steps read every shard of both domains more than once, over HTTP.

    retry_s = 6
    long = tiny_overrides(shards, tmp_path / "gone", **remote, **{"train.steps": 100000, "data.remote_retry_s": retry_s,
                                                                  "report.log_every_steps": 5})
    with open(tmp_path / "gone.log", "w") as out:
        trainer = hosts.popen("h2", train_cmd(0, long), env=process_env(), cwd=tmp_path, stdout=out, stderr=out)
    metrics = tmp_path / "gone" / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert trainer.poll() is None and time.monotonic() - t0 < 120, (tmp_path / "gone.log").read_text()[-3000:]
        time.sleep(0.1)
    server.kill()
    server.wait()
    t_gone = time.monotonic()
    code = trainer.wait(timeout=retry_s + 90)
    elapsed = time.monotonic() - t_gone
    log = (tmp_path / "gone.log").read_text()
    assert code == 2, log[-3000:]  # A data problem: one line says which shard and what to do.
    assert "retrying in" in log and "data.remote_retry_s" in log
    assert f"shard http://{hosts.addr('h1')}:{port}/train" in log and "could not be read for" in log
    assert elapsed < retry_s + 60, elapsed
