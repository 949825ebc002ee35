"""A 16-bit, single-channel "scanner" pair with a known intensity transform, in the reference folder layout.

`python datasets/scanner.py OUT [--train 300] [--test 24] [--size 64] [--seed 0]` writes OUT/trainA, trainB,
testA, testB as 16-bit grayscale PNG files (mode I;16: lossless, every one of the 65,536 levels kept).

Domain A: phantoms as a scanner of one kind would image them: a smooth background, 2-5 ellipses of tissue-like
values and fine noise, over most of the 16-bit range (about 2,000 to 50,000). Domain B: the same kind of phantom
through another scanner's response, `to_domain_b` (a fixed increasing curve that also lifts the floor).
trainA and trainB are drawn from different phantoms (unpaired); testB[i] is exactly `to_domain_b(testA[i])` under
the same file name. Values a 16-bit domain keeps and an 8-bit one loses: the B curve's slope is under 1 in
places, so neighbouring 16-bit levels stay apart only in 16 bits.

Train it with configs/scanner.yaml (model.channels_a/b=1, data.domain_*.depth=uint16).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

FLOOR, CEILING = 2_000.0, 50_000.0


def to_domain_b(image: np.ndarray) -> np.ndarray:
    """The ground-truth response of scanner B to a uint16 (H, W) image of scanner A."""
    x = image.astype(np.float64) / 65535.0
    return np.clip(np.round((0.08 + 0.9 * np.sqrt(x)) * 65535.0), 0, 65535).astype(np.uint16)


def phantom(rng: random.Random, size: int) -> np.ndarray:
    """One domain-A image: a smooth background, 2-5 ellipses and fine noise, as uint16 (H, W)."""
    gen = np.random.default_rng(rng.randrange(2**32))
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = FLOOR + rng.uniform(0, 8_000) * (1 + np.sin(2 * np.pi * (rng.random() * xx + rng.random() * yy)))
    for _ in range(rng.randint(2, 5)):
        cx, cy, rx, ry = rng.random(), rng.random(), rng.uniform(0.1, 0.35), rng.uniform(0.1, 0.35)
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        image[inside] = rng.uniform(FLOOR, CEILING)
    image += gen.normal(0, 300, image.shape)
    return np.clip(np.round(image), 0, 65535).astype(np.uint16)


def make_scanner(out: Path, train: int = 300, test: int = 24, size: int = 64, seed: int = 0) -> dict[str, int]:
    """Write the dataset to `out` (deterministic for a seed); returns the number of files per split."""
    out = Path(out)
    rng = {split: random.Random(f"{seed}:{split}") for split in ("trainA", "trainB", "test")}
    counts = {"trainA": train, "trainB": train, "testA": test, "testB": test}
    for split in counts:
        (out / split).mkdir(parents=True, exist_ok=True)
    for i in range(train):
        Image.fromarray(phantom(rng["trainA"], size)).save(out / "trainA" / f"{i:05d}.png")
        Image.fromarray(to_domain_b(phantom(rng["trainB"], size))).save(out / "trainB" / f"{i:05d}.png")
    for i in range(test):
        a = phantom(rng["test"], size)
        Image.fromarray(a).save(out / "testA" / f"{i:05d}.png")
        Image.fromarray(to_domain_b(a)).save(out / "testB" / f"{i:05d}.png")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=300, help="images per training domain")
    parser.add_argument("--test", type=int, default=24, help="held-out pairs")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = make_scanner(args.out, args.train, args.test, args.size, args.seed)
    print(f"scanner dataset in {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
