"""Shared fixtures: a small synthetic dataset sharded for real, and configs for tiny, fast runs."""

from __future__ import annotations

import os

import pytest
from support.runs import tiny_overrides


def load_synthetic():
    from support import dataset_scripts

    return dataset_scripts.load("synthetic")


@pytest.fixture(scope="session")
def synthetic():
    return load_synthetic()


@pytest.fixture(scope="session")
def shards(tmp_path_factory, synthetic) -> dict[str, str]:
    """Synthetic set (48 train images per domain, 8 held-out pairs, 40 px) as real WebDataset shards."""
    from pipeline.data.shards import write_shards

    root = tmp_path_factory.mktemp("synthetic")
    synthetic.make_synthetic(root / "images", train=48, test=8, size=40, seed=1)
    write_shards(root / "images", root / "shards", maxcount=16)
    return {split: str(root / "shards" / split / "*.tar") for split in ("trainA", "trainB", "testA", "testB")}


@pytest.fixture
def tiny(shards, tmp_path):
    """Factory: tiny(**overrides) -> list of key=value overrides for a tiny run in tmp_path/run."""
    return lambda **extra: tiny_overrides(shards, tmp_path / "run", **extra)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are collected everywhere and skipped, saying why, where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch sees none): run `make gpu-check` on a GPU machine")
    for item in gpu_items:
        item.add_marker(skip)


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
