"""`python -m pipeline.train` in a process group of one rank: run under torchrun with --nproc_per_node=1.

A plain one-process run has no group (no DDP, no collectives); this one takes the path of an 8-GPU job on one
device (nccl on CUDA, gloo on CPU; DDP wrappers; the step's, the meter's and the checkpoint's collectives).
Usage: torchrun --standalone --nproc_per_node=1 tests/support/single_rank_train.py key=value ...
"""

from __future__ import annotations

import sys

from pipeline.config import load_config
from pipeline.engine import dist
from pipeline.logs import setup_logging
from pipeline.train import cli


def main(argv: list[str]) -> int:
    info = dist.read_env()
    setup_logging(info.rank)
    cfg = load_config([], argv)
    device = dist.select_device(cfg.train.device, info)
    dist.init_process_group(info, device, cfg.dist.timeout_s, single_rank=True, socket_ifname=cfg.dist.socket_ifname)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
