"""Run under torchrun by bench_ddp.py: times the training step of this rank on fixed batches."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config  # noqa: E402
from pipeline.engine import dist  # noqa: E402
from pipeline.train.build import build_components  # noqa: E402


def main(out: str, steps: int, crop: int, overrides: list[str]) -> None:
    info = dist.read_env()
    device = torch.device("cpu")
    dist.init_process_group(info, device)
    parts = build_components(load_config([], overrides), info, device)
    g = torch.Generator().manual_seed(info.rank)
    a, b = (torch.rand(2, 1, 3, crop, crop, generator=g) * 2 - 1).unbind(0)
    for _ in range(2):
        parts.step(a, b)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        parts.step(a, b)
    dist.barrier()
    seconds = (time.perf_counter() - t0) / steps
    rss = dist.gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if info.is_main:
        Path(out).write_text(json.dumps({"world_size": info.world_size, "seconds_per_step": seconds,
                                         "peak_rss_gb_per_rank": rss}))
    # Ranks leave together, as the trainer's: a rank that tears gloo down while rank 0 still writes can make
    # rank 0's teardown abort ("terminate called without an active exception", seen once in CI).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
