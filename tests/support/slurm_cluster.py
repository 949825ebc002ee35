"""A real one-node Slurm cluster on 127.0.0.1 for the tests: munged, slurmctld and slurmd from Debian's packages.

Everything lives in a fresh temporary folder (config, state, spool, logs, munge key and socket) and listens on
free ports, so it never touches a system Slurm or munge and two test sessions do not collide. The daemons run in
the foreground as children of this process and are stopped by PID. Accounting (slurmdbd) is not run: a small
`sacct` stand-in on PATH answers Submitit's state queries from `scontrol show job` (../shared/PITFALLS.md).

Needs root (slurmd launches jobs; munged runs as user munge) and the packages `ci/install-slurm.sh` installs.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from support.runs import free_port

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")


class ClusterError(RuntimeError):
    """The test cluster cannot be started here; the message says why and what to do."""


def missing_requirements() -> str | None:
    """Why a cluster cannot start on this machine, or None when it can."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return (f"Slurm test cluster: {', '.join(missing)} not found. Install the Debian packages slurmctld, "
                "slurmd, slurm-client and munge (as root: bash ci/install-slurm.sh)")
    if os.geteuid() != 0:
        return "Slurm test cluster: must run as root (slurmd launches the jobs and munged runs as user munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "Slurm test cluster: user 'munge' does not exist (reinstall the munge package)"
    return None



SACCT_STANDIN = '''#!{python} -I
"""sacct stand-in for a cluster without slurmdbd: `sacct -o F1,F2 --parsable2 -j ID ...` from scontrol."""
import os, subprocess, sys

args, fields, ids = sys.argv[1:], ["JobID", "State"], []
for i, arg in enumerate(args):
    if arg in ("-o", "--format") and i + 1 < len(args):
        fields = args[i + 1].split(",")
    elif arg.startswith("--format="):
        fields = arg.split("=", 1)[1].split(",")
    elif arg in ("-j", "--jobs") and i + 1 < len(args):
        ids += args[i + 1].split(",")
print("|".join(fields))
for jid in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    for line in out.splitlines():
        info = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if "ArrayTaskId" in info:
            task = info["ArrayTaskId"]
            task = task if task.isdigit() else "[" + task + "]"
            info["JobID"] = info["ArrayJobId"] + "_" + task
        else:
            info["JobID"] = info.get("JobId", jid)
        info["State"] = info.get("JobState", "UNKNOWN")
        print("|".join(info.get(f, "") for f in fields))
'''


class SlurmCluster:
    """One slurmctld + one slurmd (node `hostname -s`, 2 CPUs) and a private munged, all under `root`.

    With `hosts` (tests/support/hosts.py), one slurmd per host (`slurmd -N <host>` inside its namespace, each node
    at its host's address) and slurmctld on the first host: a cluster of several nodes. Its clients (sbatch,
    scontrol, the launcher) then run on the first host too, as on a login node (`run`, `command`).
    """

    def __init__(self, root: Path | None = None, cpus: int | None = None, extra_conf: Sequence[str] = (),
                 hosts: Any = None) -> None:
        self.extra_conf = list(extra_conf)
        """slurm.conf lines appended to the defaults (a later line wins), e.g. more partitions."""
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-test-"))
        self.root.chmod(0o755)  # munged (user munge) must reach its own folder below.
        self.cpus = cpus or min(os.cpu_count() or 2, 2)
        self.hosts = hosts
        if hosts is None:
            self.node = socket.gethostname().split(".")[0]
            self.nodes = [(self.node, "127.0.0.1")]
        else:
            self.nodes = [(name, hosts.addr(name)) for name in hosts.names]
            self.node = self.nodes[0][0]
        self.conf = self.root / "slurm.conf"
        self.bin = self.root / "bin"
        self.procs: dict[str, subprocess.Popen] = {}
        self._saved_env: dict[str, str | None] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment of a client (sbatch, scontrol, Submitit) of this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.bin}:{env.get('PATH', '')}"
        return env

    # Start and stop.

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        why = missing_requirements()
        if why:
            raise ClusterError(why)
        try:
            self._start_munge()
            self._write_config()
            self._write_sacct()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)], host=self.node)
            self._wait_for(lambda: self.scontrol("ping", check=False).find("UP") >= 0, timeout_s, "slurmctld")
            for name, _ in self.nodes:
                self.start_slurmd(name)
            self._wait_for(self._node_idle, timeout_s, "the nodes to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir()
        key = munge_dir / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        key.chmod(0o600)
        munge_dir.chmod(0o711)  # munged wants its socket reachable by all, and the folder not listable.
        self.munge_socket = munge_dir / "munge.socket"
        cmd = ["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
               f"--seed-file={munge_dir / 'munged.seed'}", "--num-threads=2"]
        self._spawn("munged", cmd, user="munge")
        self._wait_for(self.munge_socket.exists, 20, "munged's socket")

    def start_slurmd(self, name: str) -> None:
        """slurmd of node `name` (again, after its host was killed: the node returns to service)."""
        key = "slurmd" if self.hosts is None else f"slurmd-{name}"
        self._spawn(key, ["slurmd", "-D", "-f", str(self.conf), "-N", name], host=name)

    def command(self, cmd: Sequence[str]) -> list[str]:
        """A client command as run where the controller is reachable (the first host, or here)."""
        return list(cmd) if self.hosts is None else self.hosts.command(self.node, cmd)

    def _write_config(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        for name, _ in self.nodes:
            (self.root / "spool" / name).mkdir()
        r = self.root
        ctl_addr = self.nodes[0][1]
        node_lines = [f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} CoresPerSocket={self.cpus} "
                      "ThreadsPerCore=1 RealMemory=20000 State=UNKNOWN" for name, addr in self.nodes]
        lines = [
            "ClusterName=pipelinetest",
            f"SlurmctldHost={self.node}({ctl_addr})",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1024",  # A job without --mem must not take the node's whole memory.
            "MailProg=/bin/true",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerParameters=batch_sched_delay=0",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",
            "MinJobAge=900",
            f"StateSaveLocation={r / 'state'}",
            # %n: each node's slurmd its own spool, pid and log file (several slurmd share this folder).
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.%n.log'}",
            *node_lines,
            # Preemption as clusters configure it: a job in `urgent` preempts jobs in `debug`, which Slurm sends
            # SIGCONT + SIGTERM, kills after GraceTime, and requeues.
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60",
            "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF",
            *self.extra_conf,
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _write_sacct(self) -> None:
        self.bin.mkdir()
        sacct = self.bin / "sacct"
        sacct.write_text(SACCT_STANDIN.replace("{python}", sys.executable))
        sacct.chmod(0o755)

    def _spawn(self, name: str, cmd: list[str], user: str | None = None, host: str | None = None) -> None:
        log = (self.root / f"{name}.out").open("ab")
        if self.hosts is not None and host is not None:
            cmd = self.hosts.command(host, cmd)
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, user=user, start_new_session=True)
        log.close()

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with code {proc.returncode} while waiting for {what}; "
                                       f"see {self.root}/{name}.out and {self.root}/*.log\n{self.logs_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs_tail()}")

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in out.splitlines() if line.strip())  # One line per node and partition.
        return set(states) == {n for n, _ in self.nodes} and set(states.values()) == {"idle"}

    def stop(self) -> None:
        """Cancel what still runs, then stop slurmd, slurmctld and munged by PID."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(self.command(["scancel", "--full", "--user=root"]), env=self.env, capture_output=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.squeue():
                time.sleep(0.3)
        daemons = [k for k in self.procs if k.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in daemons:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # Client commands.

    def run(self, *cmd: str, check: bool = True, timeout: float | None = None) -> str:
        out = subprocess.run(self.command(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.run("scontrol", *args, check=check)

    def squeue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i %T", check=False).split("\n")[:-1]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` of one job (for an array task: `ARRAY_TASK`) as a dict; {} once forgotten."""
        out = self.scontrol("show", "job", "-o", str(job_id), check=False)
        line = out.splitlines()[0] if out.strip() else ""
        return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)

    def wait_for_job(self, job_id: str, ready, timeout_s: float,
                     give_up: frozenset[str] = frozenset()) -> tuple[bool, dict[str, str]]:
        """Poll `scontrol show job` until `ready(info)`: (True, info); (False, the last info) after `timeout_s`
        or once the job is in a state of `give_up`."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if ready(info):
                return True, info
            if info.get("JobState") in give_up:
                break
            time.sleep(0.3)
        return False, info

    def array_tasks(self, array_job_id: str) -> list[dict[str, str]]:
        out = self.scontrol("show", "job", "-o", str(array_job_id), check=False)
        return [dict(tok.split("=", 1) for tok in line.split() if "=" in tok) for line in out.splitlines()]

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")) + [
            self.root / "munge" / "munged.log"
        ]:
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # Use as the environment of this process (Submitit runs sbatch and sacct from it).

    def activate(self) -> None:
        for key, value in (("SLURM_CONF", str(self.conf)), ("PATH", self.env["PATH"])):
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def deactivate(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    # Manual use: `cd tests && python -m support.slurm_cluster` starts a cluster and prints how to talk to it;
    # Ctrl-C or SIGTERM stops it and removes its folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    cluster = SlurmCluster()
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf} PATH={cluster.bin}:$PATH   # cluster in {cluster.root}", flush=True)
        while True:
            signal.pause()
    finally:
        cluster.stop()
        cluster.cleanup()
