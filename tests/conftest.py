"""Shared fixtures: a small synthetic dataset sharded for real, and configs for tiny, fast runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_synthetic():
    from pipeline import dataset_scripts

    return dataset_scripts.load("synthetic")


@pytest.fixture(scope="session")
def synthetic():
    return load_synthetic()


@pytest.fixture(scope="session")
def shards(tmp_path_factory, synthetic) -> dict[str, str]:
    """Synthetic set (48 train images per domain, 8 held-out pairs, 40 px) as real WebDataset shards."""
    from pipeline.shards import write_shards

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.make_synthetic(root / "images", train=48, test=8, size=40, seed=1)
    write_shards(root / "images", root / "shards", maxcount=16)
    return {split: str(root / "shards" / split / "*.tar") for split in ("trainA", "trainB", "testA", "testB")}


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
        "train.log_every_steps": 2,
        "train.sample_every_steps": 3,
        "train.sample_images": 2,
        "checkpoint.every_steps": 3,
        "tracking.uri": f"sqlite:///{default_run_dir.parent / 'mlflow.db'}",
        "tracking.experiment": "tests",
        "tracking.log_model": False,  # Serialising models costs seconds; the MLflow server test turns it on.
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny(shards, tmp_path):
    """Factory: tiny(**overrides) -> list of key=value overrides for a tiny run in tmp_path/run."""
    return lambda **extra: tiny_overrides(shards, tmp_path / "run", **extra)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    # Tests must not talk to a user's tracking server or inherit a torchrun environment.
    for var in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("OMP_NUM_THREADS", "2")


if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # Parallel pytest workers share the cores: one intra-op thread each, or they oversubscribe them.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
