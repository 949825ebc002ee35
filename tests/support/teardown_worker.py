"""One rank of a training run that reports what of the process group outlives its teardown.

Usage: torchrun --standalone --nproc_per_node=2 tests/support/teardown_worker.py [--fail] key=value ...
Trains with `pipeline.train.loop.run` inside `dist.process_group_teardown()`, as the training command does,
with the cyclic garbage collector off (as if no collection happened to run before exit), then prints
`alive DDP=<n>`: the DistributedDataParallel wrappers still in memory, each holding the gloo group and its
threads. With --fail, the training raises once its networks are built and wrapped; the exception is caught
after the teardown and printed as `failed: ...`, and the count is taken while it is still alive.
"""

from __future__ import annotations

import gc
import sys

from torch.nn.parallel import DistributedDataParallel

from pipeline.config import load_config
from pipeline.engine import dist
from pipeline.train import loop


def _fail(self: loop.Trainer, *args: object, **kwargs: object) -> None:
    raise RuntimeError("injected failure after the networks were built")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--fail"]:
        loop.Trainer.train = _fail
        argv = argv[1:]
    gc.disable()
    try:
        with dist.process_group_teardown():
            loop.run(load_config([], argv))
    except RuntimeError as err:
        # Counted while the exception (and its traceback) is still alive, as it is when it ends the process.
        print(f"failed: {err}", flush=True)
        print(f"alive DDP={_alive_ddp()}", flush=True)
        return 0
    print(f"alive DDP={_alive_ddp()}", flush=True)
    return 0


def _alive_ddp() -> int:
    return sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
