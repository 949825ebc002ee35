"""What a resume reads: stream state (this version) against replay (the landed code's resume), at step s and 4s.

    python benchmarks/bench_resume.py [--images 1024] [--size 96] [--maxcount 64] [--batch 4] [--buffer 128]
                                      [--steps 40] [--json benchmarks/results/resume.json] [--smoke]

Writes IMAGES generated scenes per domain (PNG, SIZE px) as shards of MAXCOUNT samples, then for local shards and
for http:// shards from a local server (which serves byte ranges as object stores do), and for a resume at step
STEPS and at 4 x STEPS (batch BATCH, shuffle buffer BUFFER, one process, no workers, so that every byte is
counted here):
- `state`: the loader resumed from the state a checkpoint at that step holds (fetch the buffered samples, seek);
- `replay`: the landed code's resume, which a checkpoint without stream state still gets: every sample consumed
  before the step is read again (not decoded) to find the streams' place.
Per row: bytes read until the first batch (local: counted by the reader; http: sent by the server), reads (a
shard opened, or one seek or range request for adjacent buffered samples) and seconds to the first batch. Then
the same on paper for 8, 64 and 512 ranks.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_json  # noqa: E402
from pipeline.data.shard_reader import READ  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402
from pipeline.data.stream import train_loader  # noqa: E402
from tests.support import dataset_scripts  # noqa: E402
from tests.support.http_server import Server  # noqa: E402


def make_shards(root: Path, images: int, size: int, maxcount: int) -> dict[str, list[Path]]:
    from PIL import Image

    synthetic = dataset_scripts.load("synthetic")
    rng = random.Random(0)
    for split in ("trainA", "trainB"):
        (root / "src" / split).mkdir(parents=True)
        for i in range(images):
            Image.fromarray(synthetic.scene(rng, size)).save(root / "src" / split / f"{i:05d}.png")
    write_shards(root / "src", root / "shards", splits=["trainA", "trainB"], maxcount=maxcount)
    return {split: sorted((root / "shards" / split).glob("*.tar")) for split in ("trainA", "trainB")}


def config(urls: dict[str, str], args: argparse.Namespace) -> SimpleNamespace:
    return SimpleNamespace(train_a=urls["trainA"], train_b=urls["trainB"], preprocess="resize_and_crop",
                           load_size=args.size, crop_size=args.size - args.size % 4, flip=True,
                           batch_per_rank=args.batch, workers=0, shuffle_buffer=args.buffer, prefetch_factor=2,
                           remote_retry_s=120.0, max_image_pixels=89_478_485)


def state_at(cfg: SimpleNamespace, step: int) -> dict:
    loader = train_loader(cfg, seed=0, rank=0)
    batches = iter(loader)
    for _ in range(step):
        next(batches)
    return loader.state_dict()


def first_batch(cfg: SimpleNamespace, start: dict, server: Server | None) -> dict:
    READ.clear()
    sent = server.sent if server else 0
    t0 = time.perf_counter()
    next(iter(train_loader(cfg, seed=0, rank=0, **start)))
    seconds = time.perf_counter() - t0
    return {"bytes_read": (server.sent - sent) if server else READ["bytes"], "reads": READ["opens"],
            "seconds_to_first_batch": seconds}


def measure(shards: dict[str, list[Path]], args: argparse.Namespace) -> list[dict]:
    rows = []
    root = shards["trainA"][0].parent.parent
    server = Server(root)
    try:
        for source in ("local", "http"):
            urls = {split: "::".join(str(p) if source == "local" else f"{server.url}/{split}/{p.name}"
                                     for p in files) for split, files in shards.items()}
            cfg = config(urls, args)
            for step in (args.steps, 4 * args.steps):
                saved = state_at(cfg, step)
                for design, start in (("replay", {"start_batch": step}), ("state", {"state": saved})):
                    row = {"source": source, "design": design, "step": step,
                           **first_batch(cfg, start, server if source == "http" else None)}
                    rows.append(row)
                    print(f"{source:5s} {design:6s} step {step:5d}: {row['bytes_read'] / 1e6:8.2f} MB read, "
                          f"{row['reads']:4d} reads, {row['seconds_to_first_batch']:6.2f} s to the "
                          "first batch", flush=True)
    finally:
        server.close()
    return rows


def on_paper(sample_kb: float = 50, shard_samples: int = 1000, batch: int = 1, workers: int = 4,
             buffer: int = 512, epochs: int = 200, images: int = 10_000) -> list[dict]:
    """Per-resume reads of the issue's example (200 epochs of a 10k-image set, batch 1 per rank, resumed at the
    run's end) at 8, 64 and 512 ranks: replay reads what the rank consumed, state what its buffers held."""
    rows = []
    for world in (8, 64, 512):
        step = epochs * images // (world * batch)
        replay = 2 * step * batch * sample_kb * 1e3  # Both domains.
        state = 2 * workers * buffer * sample_kb * 1e3  # Each worker's two buffers, refetched.
        rows.append({"world_size": world, "step": step, "replay_gb_per_rank": replay / 1e9,
                     "state_gb_per_rank": state / 1e9, "replay_gb_per_node": 8 * replay / 1e9,
                     "state_gb_per_node": 8 * state / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--maxcount", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--buffer", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "resume.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny case for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.maxcount, args.batch, args.buffer, args.steps = 48, 24, 8, 2, 8, 5
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.images, args.size, args.maxcount)
        rows = measure(shards, args)
    by = {(r["source"], r["design"], r["step"]): r for r in rows}
    growth = {f"{source}/{design}": by[source, design, 4 * args.steps]["bytes_read"]
              / max(by[source, design, args.steps]["bytes_read"], 1)
              for source, design in itertools.product(("local", "http"), ("replay", "state"))}
    for name, ratio in growth.items():
        print(f"bytes read at step {4 * args.steps} / at step {args.steps}, {name}: {ratio:.2f}")
    paper = on_paper()
    for row in paper:
        print(f"on paper, W={row['world_size']:3d} (step {row['step']:6d}): replay {row['replay_gb_per_node']:7.1f} GB "
              f"per node per resume, state {row['state_gb_per_node']:5.2f} GB")
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                           "growth_4s_over_s": growth, "on_paper": paper})
    return 0


if __name__ == "__main__":
    sys.exit(main())
