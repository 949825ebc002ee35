"""Interop with the reference implementation's weight files (`<epoch>_net_G_A.pth`, ...).

Our networks have the reference's module structure, so its state dicts load with `strict=True`. Only the
names of the four networks differ (G_ab is the reference's G_A, D_b its D_A; see `REFERENCE_NAMES`).
Files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.engine.checkpoint import CheckpointError, load_checkpoint
from pipeline.infer.interop import (
    export_reference,
    nets_from_checkpoint,
)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.interop export CKPT OUT_DIR [--epoch latest]`: our checkpoint -> reference files."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.interop", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a checkpoint's networks as reference *_net_*.pth files")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument("--epoch", default="latest")
    args = parser.parse_args(argv)
    from pipeline.config import from_yaml

    try:
        cfg = from_yaml(load_checkpoint(args.checkpoint, ranks=None)["config"])
        paths = export_reference(nets_from_checkpoint(args.checkpoint, cfg.model), args.out, args.epoch)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
