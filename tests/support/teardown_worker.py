"""One rank of a training run that reports what of the process group outlives its teardown.

Usage: torchrun --standalone --nproc_per_node=2 tests/support/teardown_worker.py key=value ...
Trains with `pipeline.train.loop.run` with the cyclic garbage collector off (as if no collection happened to
run before exit), tears the group down as the training command does, then prints `alive DDP=<n>`: the
DistributedDataParallel wrappers still in memory, each holding the gloo group and its threads.
"""

from __future__ import annotations

import gc
import sys

from torch.nn.parallel import DistributedDataParallel

from pipeline.config import load_config
from pipeline.engine import dist
from pipeline.train.loop import run


def main(argv: list[str]) -> int:
    gc.disable()
    run(load_config([], argv))
    dist.destroy_process_group()
    alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
    print(f"alive DDP={alive}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
