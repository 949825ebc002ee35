"""What the tests share for starting runs: the repository root, a tiny run's overrides, commands and ports."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "support" / "ddp_worker.py"
SINGLE_RANK = ROOT / "tests" / "support" / "single_rank_train.py"


def tiny_overrides(shards: dict[str, str], default_run_dir: Path, **extra) -> list[str]:
    """A model of a few thousand parameters on 32 px crops: a step takes milliseconds on CPU."""
    values = {
        "run_dir": str(default_run_dir),
        "model.generator": "resnet_6blocks",
        "model.ngf": 4,
        "model.ndf": 4,
        "data.train_a": shards["trainA"],
        "data.train_b": shards["trainB"],
        "data.test_a": shards["testA"],
        "data.test_b": shards["testB"],
        "data.load_size": 36,
        "data.crop_size": 32,
        "data.workers": 0,
        # CPU kernels everywhere, also where a CUDA build finds a GPU: the tests that compare bits (resume,
        # evaluate vs training) compare CPU runs; on CUDA, cudnn.benchmark picks algorithms by timing them.
        "train.device": "cpu",
        "data.shuffle_buffer": 16,
        "train.steps": 6,
        "train.pool_size": 2,
        "report.log_every_steps": 2,
        "report.sample_every_steps": 3,
        "report.sample_images": 2,
        "checkpoint.every_steps": 3,
        "tracking.uri": f"sqlite:///{default_run_dir.parent / 'mlflow.db'}",
        "tracking.experiment": "tests",
        "tracking.log_model": False,  # Serialising models costs seconds; the MLflow server test turns it on.
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(threads: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a training subprocess: this checkout importable, a fixed intra-op thread count."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path, **extra}


def train_cmd(nproc: int, overrides: list[str], *torchrun_args: str) -> list[str]:
    """`python -m pipeline.train` in one process (nproc=0), else under torchrun with nproc ranks.

    Without torchrun_args the group is `--standalone` (torchrun picks a free port); give e.g.
    `--master_addr=127.0.0.1 --master_port=P` to choose the rendezvous instead.
    """
    if nproc == 0:
        return [sys.executable, "-m", "pipeline.train", *overrides]
    return torchrun_cmd(nproc, "-m", "pipeline.train", *overrides, rendezvous=torchrun_args)


def torchrun_cmd(nproc: int, *args: str, rendezvous: tuple[str, ...] | list[str] = ()) -> list[str]:
    """torchrun with nproc ranks on this host running `args` (a script and its arguments, or `-m module ...`)."""
    where = list(rendezvous) or ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}", *args]


def single_rank_cmd(overrides: list[str]) -> list[str]:
    """The trainer under torchrun in a process group of one rank (tests/support/single_rank_train.py)."""
    return torchrun_cmd(1, str(SINGLE_RANK), *overrides)


def nets_equal(a: dict, b: dict) -> bool:
    """Whether two checkpoints hold the same four networks, bit for bit."""
    import torch

    return all(torch.equal(v, b["nets"][n][k]) for n, net in a["nets"].items() for k, v in net.items())
