"""Write one self-contained file of a checkpoint's generators, for sharing: `python -m pipeline.pack CKPT OUT`.

The file holds the generators (raw, and their EMA where the run kept one), the run's config and its step: what
`pipeline.translate`, `pipeline.evaluate` and `pipeline.export` need, read with `torch.load(weights_only=True)`.
It leaves out what only training needs (discriminators, optimisers, every rank's pools and random states), so a
checkpoint directory of hundreds of MB (more with many ranks) becomes a file of the generators' size. It reads a
checkpoint directory or a single `ckpt-*.pt` file of an earlier version.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
from pipeline.infer.generators import generators_file
from pipeline.logs import one_line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.pack", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (ckpt-*) or file (ckpt-*.pt)")
    parser.add_argument("output", type=Path, help="the file to write (.pt)")
    args = parser.parse_args(argv)
    try:
        packed = generators_file(load_checkpoint(args.checkpoint, ranks=None))
        size = save_atomic(packed, args.output)
    except (CheckpointError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    ema = "raw and EMA" if packed.get("ema", {}).get("started") else "raw"
    print(f"{args.output}: {', '.join(packed['nets'])} ({ema}) of step {packed.get('step')}, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
