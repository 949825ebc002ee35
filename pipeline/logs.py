"""Logging set-up shared by every entry point: rank 0 at INFO, the other ranks at WARNING.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("pipeline.train")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
