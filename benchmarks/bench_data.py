"""Data pipeline throughput: decoded, augmented images/s per worker and in total, JPEG and PNG shards.

    python benchmarks/bench_data.py [--images 256] [--source-size 286] [--crop 256] [--workers 1,2]
        [--seconds 8] [--step-images-per-s X] [--json out.json] [--smoke]

Writes shards of generated 286 px scenes (JPEG q95 and PNG) to a temporary folder, then times the training
loader (pipeline.data.stream.train_loader: shard reading, shuffle buffer, decode, resize/crop/flip, batching, worker
transfer) after a warm-up. Each batch is one A and one B image. `--step-images-per-s` (e.g. from
bench_step.py's JSON) prints the margin over what the training step consumes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_json  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402
from pipeline.data.stream import train_loader  # noqa: E402
from tests.support import dataset_scripts  # noqa: E402


def synthetic_module():
    return dataset_scripts.load("synthetic")


def make_shards(root: Path, n: int, size: int, fmt: str) -> dict[str, str]:
    synthetic = synthetic_module()
    rng = random.Random(0)
    for split in ("trainA", "trainB"):
        (root / "src" / split).mkdir(parents=True)
        for i in range(n):
            img = Image.fromarray(synthetic.scene(rng, size))
            path = root / "src" / split / f"{i:05d}.{'jpg' if fmt == 'jpeg' else 'png'}"
            img.save(path, quality=95) if fmt == "jpeg" else img.save(path)
    write_shards(root / "src", root / "shards", splits=["trainA", "trainB"], maxcount=64)
    return {s: str(root / "shards" / s / "*.tar") for s in ("trainA", "trainB")}


def throughput(shards: dict[str, str], workers: int, crop: int, load: int, seconds: float,
               shuffle_buffer: int = 128, pin_memory: bool = False) -> float:
    """Augmented images/s out of the training loader (one A and one B image per batch), after a warm-up;
    `pin_memory` as training sets it on CUDA."""
    cfg = SimpleNamespace(train_a=shards["trainA"], train_b=shards["trainB"], preprocess="resize_and_crop",
                          load_size=load, crop_size=crop, flip=True, batch_per_rank=1, workers=workers,
                          shuffle_buffer=shuffle_buffer, prefetch_factor=8, remote_retry_s=120.0,
                          max_image_pixels=89_478_485)
    batches = iter(train_loader(cfg, seed=0, rank=0, pin_memory=pin_memory))
    for _ in range(8 * max(workers, 1)):  # Warm-up: workers started, buffers filled.
        next(batches)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a, b = next(batches)
        n += a.shape[0] + b.shape[0]
    return n / (time.perf_counter() - t0)


def header_check_share(shards: dict[str, str], repeats: int = 200) -> dict[str, float]:
    """Microseconds per sample of the header check that judges a sample before the shuffle buffer
    (pipeline.data.skips.unusable), against decoding the same sample: what checking every sample costs."""
    import glob

    from webdataset.tariterators import tarfile_samples

    from pipeline.data.skips import unusable
    from pipeline.data.stream import decode_image

    samples = list(tarfile_samples([{"url": sorted(glob.glob(shards["trainA"]))[0]}]))[:20]
    t0 = time.perf_counter()
    for _ in range(repeats):
        for sample in samples:
            unusable(sample)
    check = (time.perf_counter() - t0) / (repeats * len(samples))
    t0 = time.perf_counter()
    for _ in range(max(1, repeats // 20)):
        for sample in samples:
            decode_image(sample)
    decode = (time.perf_counter() - t0) / (max(1, repeats // 20) * len(samples))
    return {"check_us": 1e6 * check, "decode_us": 1e6 * decode, "share": check / decode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images per domain")
    parser.add_argument("--source-size", type=int, default=286)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--step-images-per-s", type=float, default=None)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/data.json"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.source_size, args.crop, args.workers, args.seconds = 16, 40, 32, "1", 0.5
    load = args.source_size
    rows, checks = [], {}
    print(f"{'format':<7}{'workers':>8}{'img/s':>10}{'img/s/worker':>14}{'x step':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jpeg", "png"):
            shards = make_shards(Path(tmp) / fmt, args.images, args.source_size, fmt)
            checks[fmt] = header_check_share(shards, 10 if args.smoke else 200)
            for workers in (int(w) for w in args.workers.split(",")):
                rate = throughput(shards, workers, args.crop, load, args.seconds)
                margin = rate / args.step_images_per_s if args.step_images_per_s else None
                rows.append(dict(format=fmt, workers=workers, images_per_s=rate, per_worker=rate / workers,
                                 crop=args.crop, source_size=args.source_size, margin_over_step=margin))
                shown = f"{margin:.0f}x" if margin else "-"
                print(f"{fmt:<7}{workers:>8}{rate:>10.1f}{rate / workers:>14.1f}{shown:>9}", flush=True)
    for fmt, c in checks.items():
        print(f"{fmt} header check per sample: {c['check_us']:.1f} us, decode {c['decode_us']:.0f} us "
              f"({100 * c['share']:.1f}% of decoding)")
    write_json(args.json, {"rows": rows, "header_check": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
