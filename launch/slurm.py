"""Submit a training run to Slurm through Submitit: `python -m launch.slurm --config configs/X.yaml ...`.

    python -m launch.slurm --config configs/horse2zebra.yaml --slurm-config example_gpu \\
        slurm.nodes=2 slurm.gpus_per_node=8 slurm.partition=gpu slurm.time_min=1440 train.steps=400000

Arguments `slurm.KEY=VALUE` set the job (the `SlurmConfig` group below, overlaid on the YAML files given with
`--slurm-config`, a path or a name in configs/slurm/); every other `KEY=VALUE` overrides the training config.
Both are checked before anything is submitted, so a typo fails here and not in the queue. `--dry-run` prints the
sbatch script instead of submitting. `slurm.cluster=local` runs the same job as processes on this machine.

The job survives its time limit and preemption (see `TrainJob`): every rank stops after the same step, the trainer
writes its checkpoint, rank 0 requeues the job through Submitit, and the requeued job resumes from the checkpoint
and continues the same MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf
from submitit.core.utils import JobPaths

from pipeline.config import ConfigError, Schema, load_config, to_yaml

log = logging.getLogger("launch.slurm")

CODE_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_CONFIGS = CODE_ROOT / "configs" / "slurm"


@dataclass
class SlurmConfig:
    cluster: str = "slurm"
    """slurm (sbatch), local (Submitit's LocalExecutor: processes on this machine) or debug (in this process)."""
    nodes: int = 1
    """Nodes of the job."""
    gpus_per_node: int = 0
    """GPUs per node; the job runs one task (rank) per GPU."""
    tasks_per_node: int = 0
    """Tasks (ranks) per node; 0: one per GPU, or 1 without GPUs. With GPUs it must equal gpus_per_node."""
    cpus_per_task: int = 0
    """CPUs per task; 0: data.workers + 1 (the loader's workers and the training process)."""
    mem_gb_per_task: float = 0.0
    """Memory per task in GB (sbatch --mem is this times tasks_per_node); 0: the partition's default."""
    time_min: int = 1440
    """Time limit of each attempt in minutes; a longer run is requeued after each limit (see max_num_timeout)."""
    signal_delay_s: int = 120
    """Slurm sends USR2 this long before the time limit (--signal): enough for a step and a checkpoint."""
    max_num_timeout: int = 10
    """Requeues after time limits before the job gives up (with time_min <= 50, preemptions count too)."""
    partition: str = ""
    """Slurm partition; empty: the cluster's default."""
    account: str = ""
    """Slurm account to charge; empty: the user's default."""
    qos: str = ""
    """Slurm quality of service; empty: the default."""
    constraint: str = ""
    """Node features required (sbatch --constraint), e.g. a100|h100."""
    sbatch_options: dict[str, Any] = field(default_factory=dict)
    """Further sbatch options without the leading --, e.g. {exclusive: true, mail-type: END}."""
    srun_args: list[str] = field(default_factory=list)
    """Further srun arguments (--cpus-per-task is always passed: srun does not inherit it)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the tasks start (module load, conda activate, exports)."""
    log_folder: str = ""
    """Folder of Submitit's scripts, pickles and task logs; empty: <run_dir>/submitit."""
    job_name: str = ""
    """Slurm job name; empty: the run directory's name."""
    array_parallelism: int = 16
    """Sweeps: array elements that may run at the same time."""


SLURM_SCHEMA = Schema(SlurmConfig, prefix="slurm.")
CLUSTERS = ("slurm", "local", "debug")


# Configuration.


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """`slurm.KEY=VALUE` items (prefix removed) and the training overrides, in their order."""
    slurm, train = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' is not of the form key=value")
        if item.startswith("slurm."):
            slurm.append(item.removeprefix("slurm."))
        else:
            train.append(item)
    return slurm, train


def cluster_config_path(name: str) -> Path:
    """A --slurm-config argument: a YAML path, or the name of a file in configs/slurm/."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"slurm config file '{name}' does not exist")
        return path
    known = sorted(p.stem for p in CLUSTER_CONFIGS.glob("*.yaml"))
    if name not in known:
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(f"no slurm config '{name}' in {CLUSTER_CONFIGS}; {hint}known: {', '.join(known)}")
    return CLUSTER_CONFIGS / f"{name}.yaml"


def load_slurm_config(yaml_paths: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """The job's settings: `SlurmConfig` defaults, then each cluster YAML file, then `KEY=VALUE` overrides.

    Args:
        yaml_paths: cluster files (paths or names in configs/slurm/), applied in order.
        overrides: `KEY=VALUE` strings without the `slurm.` prefix.

    Raises:
        ConfigError: a missing file, an unknown key (naming the closest valid one), a wrong type or value.
    """
    files = [(path, f"slurm config file '{path}'") for path in map(cluster_config_path, map(str, yaml_paths))]
    cfg = SLURM_SCHEMA.load(files, overrides)
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _validate(s: DictConfig) -> None:
    if s.cluster not in CLUSTERS:
        near = difflib.get_close_matches(str(s.cluster), CLUSTERS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(f"'slurm.cluster' is '{s.cluster}'; {hint}choose one of: {', '.join(CLUSTERS)}")
    for key in ("nodes", "time_min", "signal_delay_s", "array_parallelism"):
        if s[key] < 1:
            raise ConfigError(f"'slurm.{key}' must be at least 1, got {s[key]}")
    for key in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb_per_task", "max_num_timeout"):
        if s[key] < 0:
            raise ConfigError(f"'slurm.{key}' must be >= 0, got {s[key]}")
    if s.gpus_per_node and s.tasks_per_node not in (0, s.gpus_per_node):
        raise ConfigError(f"slurm.tasks_per_node={s.tasks_per_node} with slurm.gpus_per_node={s.gpus_per_node}: "
                          "the job runs one task per GPU (leave tasks_per_node at 0)")
    if s.signal_delay_s >= 60 * s.time_min:
        raise ConfigError(f"slurm.signal_delay_s={s.signal_delay_s} is not shorter than the time limit "
                          f"(slurm.time_min={s.time_min}): the warning would come before training starts")
    if s.cluster != "slurm" and s.nodes > 1:
        raise ConfigError(f"slurm.cluster={s.cluster} runs on this machine only: slurm.nodes must be 1")
    if s.cluster == "debug" and max(s.tasks_per_node, s.gpus_per_node) > 1:
        raise ConfigError("slurm.cluster=debug runs one task in this process: use slurm.cluster=local for more")


@dataclass(frozen=True)
class JobShape:
    """The job's size, resolved from the slurm group and the training config."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: float
    """Per node (sbatch --mem); 0: not requested."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def job_shape(s: DictConfig, train: DictConfig) -> JobShape:
    tasks = s.tasks_per_node or s.gpus_per_node or 1
    cpus = s.cpus_per_task or train.data.workers + 1
    return JobShape(s.nodes, tasks, s.gpus_per_node, cpus, s.mem_gb_per_task * tasks)


def check_compatible(s: DictConfig, train: DictConfig) -> None:
    """Training settings that cannot work as a Submitit job."""
    if train.control.stop_after_steps:
        raise ConfigError("control.stop_after_steps chains jobs by hand; a Submitit job requeues itself at its time "
                          "limit and on preemption: leave control.stop_after_steps at 0")
    if train.train.device == "cuda" and s.gpus_per_node == 0 and s.cluster == "slurm":
        raise ConfigError("train.device=cuda but slurm.gpus_per_node=0: request GPUs or use train.device=auto")


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def sbatch_parameters(s: DictConfig, shape: JobShape, job_name: str) -> dict[str, Any]:
    """Submitit's Slurm parameters (sbatch's names): one source for the submission and for --dry-run."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": s.time_min,
        "nodes": shape.nodes,
        "ntasks_per_node": shape.tasks_per_node,
        "cpus_per_task": shape.cpus_per_task,
        "signal_delay_s": s.signal_delay_s,
        # Submitit requeues with `scontrol requeue`, which a cluster with JobRequeue=0 refuses unless asked here.
        "additional_parameters": {"requeue": True, **OmegaConf.to_container(s.sbatch_options)},
        # Slurm 22.05/23.02's srun does not inherit --cpus-per-task from sbatch.
        "srun_args": [f"--cpus-per-task={shape.cpus_per_task}", *s.srun_args],
        "array_parallelism": s.array_parallelism,
    }
    if shape.gpus_per_node:
        params["gpus_per_node"] = shape.gpus_per_node
    if shape.mem_gb:
        params["mem"] = _mem(shape.mem_gb)
    for key in ("partition", "account", "qos", "constraint"):
        if s[key]:
            params[key] = s[key]
    params["setup"] = [code_path_line(), *s.setup]
    return params


def code_path_line() -> str:
    """A setup line that lets the job import this code (Submitit pickles TrainJob by reference)."""
    root = shlex.quote(str(CODE_ROOT))
    return f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}"


@contextlib.contextmanager
def code_on_pythonpath() -> Iterator[None]:
    """While submitting: the local executor's processes (and sbatch) inherit this environment."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), old]))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def log_folder(s: DictConfig, run_dir: str) -> Path:
    return Path(s.log_folder or Path(run_dir) / "submitit").expanduser().absolute()


def make_executor(s: DictConfig, shape: JobShape, folder: Path, job_name: str) -> submitit.AutoExecutor:
    """An AutoExecutor for slurm.cluster, with the job's parameters set."""
    executor = submitit.AutoExecutor(folder=folder, cluster=s.cluster, slurm_max_num_timeout=s.max_num_timeout,
                                     local_max_num_timeout=s.max_num_timeout)
    if s.cluster == "slurm":
        params = {f"slurm_{k}": v for k, v in sbatch_parameters(s, shape, job_name).items()}
    elif s.cluster == "local":
        params = {"timeout_min": s.time_min, "tasks_per_node": shape.tasks_per_node,
                  "gpus_per_node": shape.gpus_per_node, "name": job_name}
        if s.setup:  # Then the controller runs under a shell (which job.cancel() signals instead).
            params["local_setup"] = list(s.setup)
    else:
        params = {"timeout_min": s.time_min, "name": job_name}
    executor.update_parameters(**params)
    return executor


def sbatch_script(s: DictConfig, shape: JobShape, folder: Path, job_name: str, array_size: int = 0) -> str:
    """The sbatch script Submitit writes for these settings (what --dry-run prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size or None,
                               **sbatch_parameters(s, shape, job_name))


def describe(s: DictConfig, shape: JobShape) -> str:
    """The job's shape and its stop/requeue behaviour, as comment lines."""
    gpus = f", {shape.gpus_per_node} GPUs per node (one per task)" if shape.gpus_per_node else ", no GPUs"
    mem = f", {_mem(shape.mem_gb)} per node" if shape.mem_gb else ""
    return "\n".join([
        f"# cluster={s.cluster}: {shape.nodes} node(s) x {shape.tasks_per_node} task(s) per node = "
        f"{shape.world_size} rank(s){gpus}, {shape.cpus_per_task} CPU(s) per task{mem}, {s.time_min} min per attempt",
        f"# time limit: Slurm sends USR2 {s.signal_delay_s} s before it (--signal); preemption sends SIGTERM.",
        "# requeue: on either signal every rank stops after the same step, the trainer writes its checkpoint and",
        f"#   rank 0 requeues the job (sbatch --requeue; scontrol requeue), at most {s.max_num_timeout} time-outs;",
        "#   the requeued job resumes from that checkpoint and continues the same MLflow run. scancel stops the",
        "#   job the same way (a checkpoint) without requeueing it.",
    ])


def tracking_uri(train: DictConfig) -> str:
    """Where the job's MLflow records go (the job inherits this environment and working directory)."""
    return train.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def tracking_target(train: DictConfig) -> str:
    if not train.tracking.enabled:
        return "off (tracking.enabled=false)"
    name = train.tracking.run_name or Path(train.run_dir).name
    return f"experiment '{train.tracking.experiment}', run '{name}' at {tracking_uri(train)}"


def sqlite_on_many_nodes_warning(s: DictConfig, train: DictConfig) -> str | None:
    """The warning for a multi-node job that would record to a SQLite file, with the server to use instead."""
    if s.nodes < 2 or not train.tracking.enabled:
        return None
    uri = tracking_uri(train)
    if not uri.startswith("sqlite:"):
        return None
    folder = Path(uri.removeprefix("sqlite:///")).parent
    return (f"a {s.nodes}-node job records to the SQLite file {uri}. Only rank 0 writes, but that file usually "
            "sits on a network filesystem, where SQLite's locking is unreliable (a requeued job, the MLflow UI or a "
            "sweep reading it can corrupt it). Run a tracking server instead, on a machine every node reaches:\n"
            f"    mlflow server --backend-store-uri {uri} --artifacts-destination {folder / 'mlartifacts'} "
            "--host 0.0.0.0 --port 5000\n"
            "and submit with tracking.uri=http://<that host>:5000")


# The job.


@dataclass
class JobResult:
    """What each task of a finished job returns (plain values: reading it needs no torch)."""

    rank: int
    step: int
    run_id: str | None
    run_dir: str
    metrics: dict[str, float]
    evaluation: dict[str, float]


def master_port(job_id: str, attempt: int) -> int:
    """The rendezvous port of one attempt of a job: the same on every task, agreed without communication.

    Submitit draws it from 20000-60000 by job id alone. Linux hands out outgoing connections' ports from 32768 up,
    so such a port can already be taken on rank 0's node, and a requeued attempt would reuse the port of the
    attempt before it. This range lies below Linux's default ephemeral range, and the port changes with each
    attempt. Two jobs with the same id on one node (two clusters) still collide: nothing here can prevent that.
    """
    return 20000 + zlib.crc32(f"{job_id}:{attempt}".encode()) % 12000


def resume_auto(config_yaml: str) -> str:
    """The same config with checkpoint.resume=auto: a requeued job continues from its own newest checkpoint."""
    cfg = OmegaConf.create(config_yaml)
    cfg.checkpoint.resume = "auto"
    return OmegaConf.to_yaml(cfg)


class JobStopped(RuntimeError):
    """A signal stopped the run (checkpoint written) and nothing requeues it: the job was cancelled."""


class TrainJob(submitit.helpers.Checkpointable):
    """One training run as a Submitit job; each task of the job is one rank.

    How a time limit or a preemption becomes a resumed run:
    1. Slurm sends USR2 to every task `signal_delay_s` before the time limit (--signal), and SIGTERM when it
       preempts the job (then kills it after the partition's GraceTime). Submitit installed its handlers before
       calling us (USR2: checkpoint and requeue, on global rank 0 only; SIGTERM: ignored). `__call__` replaces
       them with a `StopFlag` for the whole call, so a signal only sets a flag on each rank; nothing is saved
       from inside a signal handler.
    2. The training step carries the flag through its per-step collective: every rank stops after the same step,
       and the trainer writes one checkpoint through its own checkpoint code; `run()` returns stopped.
    3. With the flag uninstalled, Submitit's handlers are back, and rank 0 decides (`_after_stop`): after USR2,
       or SIGTERM from a preemption (scontrol shows a PreemptTime), it calls Submitit's USR2 handler itself. That
       counts time-outs (max_num_timeout), calls `checkpoint()` (which resubmits this call: the state is already
       on disk), writes the new submission, runs `scontrol requeue` and exits. A preempted job must requeue
       itself: Slurm requeues it only if it is still running at the end of GraceTime. SIGTERM from `scancel`
       is not a preemption: the job ends there, with its checkpoint. The other ranks leave without a result.
    The requeued job resumes from the newest checkpoint and the MLflow run id stored in it. A signal that arrives
    before the flag is installed (while Python starts) reaches Submitit's handler directly: USR2 requeues at
    once and the run resumes from its last periodic checkpoint.
    """

    def __init__(self, cpus_per_task: int) -> None:
        self.cpus_per_task = cpus_per_task

    def __call__(self, config_yaml: str) -> JobResult:
        from pipeline.engine.stop import StopFlag

        stop = StopFlag().install()  # First: torch and MLflow take seconds to import.
        try:
            return self._train(config_yaml, stop)
        finally:
            stop.uninstall()

    def _train(self, config_yaml: str, stop: Any) -> JobResult:
        env = submitit.JobEnvironment()
        os.environ.setdefault("MASTER_PORT", str(master_port(env.job_id, int(os.environ.get("SLURM_RESTART_COUNT",
                                                                                           "0")))))
        # Every GPU of the node stays visible: pipeline.engine.dist picks cuda:LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ["MASTER_ADDR"] = master_address(os.environ["MASTER_ADDR"])
        import torch

        from pipeline.config import from_yaml
        from pipeline.engine import dist
        from pipeline.logs import setup_logging
        from pipeline.train.loop import run

        setup_logging(env.global_rank)
        logging.getLogger("submitit").propagate = False  # It has its own handler: one line per message.
        cfg = from_yaml(config_yaml)
        # The task's CPUs, less those its loader workers decode on (the default would oversubscribe the node).
        threads = max(1, self.cpus_per_task - cfg.data.workers)
        torch.set_num_threads(threads)
        log.info("%s; MASTER_ADDR=%s MASTER_PORT=%s, %d torch threads", env, os.environ["MASTER_ADDR"],
                 os.environ["MASTER_PORT"], threads)
        with dist.process_group_teardown():
            result = run(cfg, stop_flag=stop)
        if result.stopped:
            stop.uninstall()
            _after_stop(env, stop.signal, result.step)
        return JobResult(env.global_rank, result.step, result.run_id, str(Path(cfg.run_dir).resolve()),
                         result.metrics, result.evaluation)

    def checkpoint(self, config_yaml: str) -> submitit.helpers.DelayedSubmission:
        """Called by Submitit on rank 0 before it requeues: resubmit this run (its state is in run_dir)."""
        log.info("requeueing: the job resumes from the newest checkpoint in its run directory")
        return submitit.helpers.DelayedSubmission(self, resume_auto(config_yaml))


def _slurm_node_addr(node: str) -> str | None:
    """The NodeAddr Slurm has for `node` (`scontrol show node`), or None."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    info = dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)
    return info.get("NodeAddr") or None


def master_address(first_node: str) -> str:
    """The first node of the job (Submitit's MASTER_ADDR, a node name): kept where it resolves, else the
    address Slurm reaches that node at (clusters whose node names are not in DNS)."""
    try:
        socket.getaddrinfo(first_node, None)
        return first_node
    except OSError:
        return _slurm_node_addr(first_node) or first_node


def _slurm_job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


def _after_stop(env: Any, signum: int | None, step: int) -> None:
    """A signal stopped the run after `step`, its checkpoint written: requeue the job, or end it, on rank 0."""
    usr_sig = submitit.JobEnvironment._usr_sig()
    handler = signal.getsignal(usr_sig)
    if not callable(handler):  # The debug executor: no Submitit signal handling, nothing to requeue.
        log.warning("stopped after step %d; not requeued (no Submitit signal handler here)", step)
        return
    if env.global_rank != 0:
        # No result: the job is not over, or rank 0 reports how it ended. Exit 0: nothing to read as a crash.
        raise SystemExit(0)
    name = signal.Signals(signum).name if signum else "another rank's signal"
    requeue = signum in (None, signal.SIGUSR1, signal.SIGUSR2, usr_sig)  # The time limit's warning.
    if signum == signal.SIGTERM and env.cluster == "slurm":
        info = _slurm_job_info(env.job_id)
        if info.get("PreemptTime", "None") not in ("None", "Unknown", ""):
            name, requeue = f"SIGTERM (preempted at {info['PreemptTime']})", True
        elif int(info.get("Restarts", "0")) > int(os.environ.get("SLURM_RESTART_COUNT", "0")):
            log.warning("stopped after step %d on SIGTERM; Slurm requeues the job itself (scontrol requeue)", step)
            raise SystemExit(0)  # Leave no result behind: the requeued job writes the real one.
    if not requeue:
        raise JobStopped(f"stopped by {name} after step {step}, with a checkpoint; not requeued (the job was "
                         "cancelled): submit the same command again to continue the run")
    log.warning("stopped by %s after step %d with the checkpoint written; requeueing through Submitit", name, step)
    handler(usr_sig, None)  # Requeues and exits; raises UncompletedJobError after too many time-outs.


# Command line.


@dataclass
class Submission:
    jobs: list[Any]
    train: DictConfig
    slurm: DictConfig
    folder: Path
    script: str = ""
    """The sbatch script (--dry-run with cluster=slurm)."""


def parse_args(argv: Sequence[str] | None, prog: str = "python -m launch.slurm") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="training YAML (repeatable, in order)")
    parser.add_argument("--slurm-config", action="append", default=[],
                        help="slurm YAML: a path or a name in configs/slurm/ (repeatable, in order)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting")
    parser.add_argument("overrides", nargs="*", help="slurm.KEY=VALUE (the job) and KEY=VALUE (training)")
    return parser.parse_intermixed_args(argv)


def prepare(args: argparse.Namespace) -> tuple[DictConfig, DictConfig, JobShape]:
    """Both configs, checked (on the login node) before anything is submitted."""
    slurm_overrides, train_overrides = split_overrides(args.overrides)
    s = load_slurm_config(args.slurm_config, slurm_overrides)
    train = load_config(args.config, train_overrides)
    check_compatible(s, train)
    return s, train, job_shape(s, train)


def submit(argv: Sequence[str] | None = None) -> Submission:
    """Check the configs and submit the run (or only build the script with --dry-run)."""
    args = parse_args(argv)
    s, train, shape = prepare(args)
    warning = sqlite_on_many_nodes_warning(s, train)
    if warning:
        log.warning("%s", warning)
    folder = log_folder(s, train.run_dir)
    job_name = s.job_name or Path(train.run_dir).name
    if args.dry_run:
        script = sbatch_script(s, shape, folder, job_name) if s.cluster == "slurm" else ""
        return Submission([], train, s, folder, script)
    executor = make_executor(s, shape, folder, job_name)
    with code_on_pythonpath():
        job = executor.submit(TrainJob(shape.cpus_per_task), to_yaml(train))
    return Submission([job], train, s, folder)


def task_logs(job: Any, folder: Path) -> tuple[Path, Path]:
    paths = JobPaths(folder, job_id=job.job_id, task_id=0)
    return paths.stdout, paths.stderr


def report(sub: Submission) -> str:
    """What main() prints after submitting."""
    job = sub.jobs[0]
    shape = job_shape(sub.slurm, sub.train)
    out, err = task_logs(job, sub.folder)
    where = {"slurm": "Slurm job", "local": "local job (controller pid)", "debug": "debug job"}[sub.slurm.cluster]
    return "\n".join([
        f"Submitted {where} {job.job_id}: {shape.nodes} node(s) x {shape.tasks_per_node} task(s) = "
        f"{shape.world_size} rank(s)",
        f"  logs:    {out} and {err} (rank 0; rank N: {job.job_id}_N_log.*)",
        f"  run dir: {Path(sub.train.run_dir).resolve()}",
        f"  MLflow:  {tracking_target(sub.train)} (a requeued job continues the same run)",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sub = submit(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not sub.jobs:
        print(describe(sub.slurm, job_shape(sub.slurm, sub.train)))
        print(f"# run dir: {Path(sub.train.run_dir).resolve()}; MLflow: {tracking_target(sub.train)}")
        print(sub.script or f"# cluster={sub.slurm.cluster}: no sbatch script; Submitit starts the tasks itself.")
        return 0
    print(report(sub), flush=True)
    if sub.slurm.cluster == "debug":
        print(sub.jobs[0].result())
    return 0


if __name__ == "__main__":
    sys.exit(main())
