"""Check WebDataset shards: samples per shard, every image decoded (or a sample), sizes, the manifest's sha256.

`python -m pipeline.shards inspect PATTERN [--sample N] [--manifest PATH] [--workers N] [--json OUT]`

PATTERN is what training accepts (a path, brace or glob pattern, file:, pipe: or http(s) URL; '::' joins
several). Each shard is read once as a stream: its sha256 and size are computed on the way, members are grouped
into samples as WebDataset groups them, and every image member is fully decoded (with `--sample N`, N random
samples per shard are decoded; width and height still come from every image's header). The manifest is the
`--manifest` given (a file or its folder), else the manifest.json beside the shards' folder (`OUT/manifest.json`
for `OUT/trainA/*.tar`) or in it; each shard it lists must match its sha256, size and sample count.

Exit code 0: no problem found; 1: problems found (corrupt members, unreadable shards, manifest mismatches,
shards the manifest does not list), each listed; 2: the pattern or manifest cannot be used.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.data.shard_inspect import (
    inspect_shards,
    print_report,
)
from pipeline.data.shards import ShardError
from pipeline.data.stream import DataError


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.shards inspect` entry; returns 0 (clean), 1 (problems found) or 2 (usage)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.shards inspect", description=__doc__.splitlines()[0])
    parser.add_argument("pattern", help="shard pattern, as data.train_a accepts (quote globs and braces)")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="fully decode N random samples per shard instead of all")
    parser.add_argument("--manifest", default=None, help="manifest.json (or its folder) to check sha256 against")
    parser.add_argument("--workers", type=int, default=1, help="shards inspected in parallel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample choice")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        report = inspect_shards(args.pattern, args.sample, args.manifest, args.workers, args.seed)
    except (DataError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json is not None:
        data: dict[str, Any] = asdict(report)
        for shard in data["shards"]:
            for key in ("widths", "heights", "sizes"):
                del shard[key]  # Per-image lists: the statistics below summarise them.
        data.update(ok=report.ok, problems=report.problems, size_stats=report.size_stats())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0 if report.ok else 1
