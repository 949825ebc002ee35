"""Sharding throughput (files/s) with 1 and more workers, and the decode throughput gained by resizing at shard time.

    python benchmarks/bench_shards.py [--images 3000] [--size 500x375] [--workers 1,2] [--resize 286]
        [--crop 256] [--loader-workers 1] [--seconds 8] [--json benchmarks/results/shards.json] [--smoke]

Generates a tree of JPEG photos-like images (random scenes with sensor-like noise, q90, 500x375 as in the real
photo sets; half trainA, half trainB; not timed), then times pipeline.data.shards.write_shards on it with each worker
count, storing the original bytes (decode check only) and resizing to --resize with JPEG q95 re-encoding. Every
worker count must give byte-identical shards (checked). Then times the training loader
(pipeline.data.stream.train_loader: read, decode, resize to load_size, random crop --crop, flip, batch) on the original
shards and on the resized ones, where training's resize is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.data.shards import write_shards  # noqa: E402
from tests.support import dataset_scripts  # noqa: E402


def _synthetic():
    return dataset_scripts.load("synthetic")  # Executed once, not per generated image.


def _make_image(args: tuple[Path, int, int, int]) -> None:
    path, index, width, height = args
    rng = random.Random(index)
    scene = _synthetic().scene(rng, max(width, height))[:height, :width].astype(np.int16)
    noise = np.random.default_rng(index).normal(0, 10, scene.shape).round().astype(np.int16)
    Image.fromarray(np.clip(scene * 1.8 + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_tree(root: Path, images: int, width: int, height: int, workers: int) -> Path:
    """images JPEGs, half in trainA and half in trainB."""
    tasks = []
    for index in range(images):
        split = "trainA" if index % 2 == 0 else "trainB"
        (root / split).mkdir(parents=True, exist_ok=True)
        tasks.append((root / split / f"{index:06d}.jpg", index, width, height))
    with ProcessPoolExecutor(max(workers, 1)) as pool:
        list(pool.map(_make_image, tasks, chunksize=32))
    return root


def digest(folder: Path) -> str:
    """One hash over every tar's name and bytes: equal for byte-identical outputs."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.tar")):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def shard_rate(src: Path, out: Path, workers: int, **options) -> tuple[float, float, int]:
    """(files/s, seconds, files) of one write_shards run."""
    t0 = time.perf_counter()
    manifest = write_shards(src, out, splits=["trainA", "trainB"], maxcount=500, workers=workers, **options)
    seconds = time.perf_counter() - t0
    files = sum(e["count"] for e in manifest["splits"].values()) + len(manifest["skipped"])
    return files / seconds, seconds, files


def decode_rate(shards: Path, load: int, crop: int, workers: int, seconds: float) -> float:
    """Augmented images/s out of the training loader (one A and one B image per batch)."""
    # Imported here: the image-generating pool's children re-import this module and need no torch.
    from bench_data import throughput

    patterns = {split: str(shards / split / "*.tar") for split in ("trainA", "trainB")}
    return throughput(patterns, workers, crop, load, seconds, shuffle_buffer=64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="images in the generated tree (both domains)")
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--workers", default="1,2", help="comma-separated sharding worker counts")
    parser.add_argument("--resize", type=int, default=286, help="shard-time resize (= data.load_size)")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader workers of the decode test")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per decode measurement")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/shards.json"))
    parser.add_argument("--smoke", action="store_true", help="a tiny case for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.resize, args.crop, args.seconds = 40, "64x48", 36, 32, 0.5
    width, height = (int(v) for v in args.size.lower().split("x"))
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        src = make_tree(tmp / "src", args.images, width, height, max(counts + [os.cpu_count() or 1]))
        size_mb = sum(p.stat().st_size for p in src.rglob("*.jpg")) / 1e6
        print(f"generated {args.images} JPEGs of {width}x{height} ({size_mb:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPU(s)")
        print(f"{'stage':<8}{'variant':<26}{'workers':>8}{'rate':>12}  {'unit':<8}{'seconds':>9}{'vs 1 worker':>13}")
        variants = [("copy", "original bytes (verify)", {}),
                    ("resize", f"resize {args.resize} + JPEG q95", {"resize": args.resize, "format": "jpeg"})]
        digests: dict[str, set[str]] = {}
        for key, label, options in variants:
            base = None
            for workers in counts:
                out = tmp / f"{key}-w{workers}"
                rate, seconds, files = shard_rate(src, out, workers, **options)
                digests.setdefault(key, set()).add(digest(out))
                base = base or rate
                rows.append(dict(stage="shard", variant=key, label=label, workers=workers, rate=rate,
                                 unit="files/s", seconds=seconds, files=files, speedup=rate / base))
                print(f"{'shard':<8}{label:<26}{workers:>8}{rate:>12,.1f}  {'files/s':<8}{seconds:>9.2f}"
                      f"{rate / base:>12.2f}x", flush=True)
        identical = all(len(d) == 1 for d in digests.values())
        print(f"shards byte-identical across worker counts: {'yes' if identical else 'NO'}")
        original = decode_rate(tmp / f"copy-w{counts[0]}", args.resize, args.crop, args.loader_workers, args.seconds)
        resized = decode_rate(tmp / f"resize-w{counts[0]}", args.resize, args.crop, args.loader_workers, args.seconds)
        for key, label, rate in (("original", f"original {width}x{height}", original),
                                 ("resized", f"resized {args.resize} at shard time", resized)):
            rows.append(dict(stage="decode", variant=key, label=label, workers=args.loader_workers, rate=rate,
                             unit="img/s", seconds=args.seconds, crop=args.crop, speedup=rate / original))
            print(f"{'decode':<8}{label:<26}{args.loader_workers:>8}{rate:>12,.1f}  {'img/s':<8}{args.seconds:>9.2f}"
                  f"{'':>13}", flush=True)
        print(f"decode gain from resizing at shard time: {resized / original:.2f}x "
              f"(loader with {args.loader_workers} worker(s), {args.crop} crop)")
    if not identical:
        print("error: worker counts gave different shards", file=sys.stderr)
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "images": args.images, "size": [width, height],
                                     "cpus": os.cpu_count(), "identical": identical}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
