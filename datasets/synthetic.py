"""A procedural two-domain dataset with a known A->B mapping, in the reference folder layout.

`python datasets/synthetic.py OUT [--train 400] [--test 32] [--size 72] [--seed 0]` writes OUT/trainA, trainB,
testA, testB as PNG files (lossless, so the ground truth is exact).

Domain A: dark scenes (every channel in [0, 0.55]) of a vertical gradient and a few ellipses and rectangles.
Domain B: the same kind of scene passed through a fixed per-channel colour map `to_domain_b` (increasing affine
maps that brighten and tint). trainA and trainB are drawn from different scenes (unpaired); testB[i] is exactly
`to_domain_b(testA[i])` under the same file name, so a trained G_ab can be scored against the truth.
The map is increasing per channel on purpose: it is the transport between the two colour distributions that
needs no reordering of colours, so it is the one CycleGAN's objective (adversarial + cycle) should find.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# to_domain_b(x)_c = GAIN[c] * x_c + OFFSET[c], x in [0, 1].
GAIN = np.array([0.9, 0.8, 0.5], dtype=np.float64)
OFFSET = np.array([0.45, 0.30, 0.15], dtype=np.float64)
A_MAX = 0.55


def to_domain_b(image: np.ndarray) -> np.ndarray:
    """Apply the ground-truth colour map to a uint8 HxWx3 image of domain A."""
    x = image.astype(np.float64) / 255.0
    return np.clip(np.round((x * GAIN + OFFSET) * 255.0), 0, 255).astype(np.uint8)


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(int(rng.uniform(0, A_MAX) * 255) for _ in range(3))  # type: ignore[return-value]


def scene(rng: random.Random, size: int) -> np.ndarray:
    """One domain-A image: a vertical gradient between two colours and 2-5 filled shapes."""
    top, bottom = np.array(_colour(rng), float), np.array(_colour(rng), float)
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (top * (1 - t) + bottom * t).repeat(size, axis=1).round().astype(np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):
        w, h = rng.randint(size // 6, size // 2), rng.randint(size // 6, size // 2)
        x, y = rng.randint(-w // 3, size - 2 * w // 3), rng.randint(-h // 3, size - 2 * h // 3)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=_colour(rng))
    return np.array(img)


def make_synthetic(out: Path, train: int = 400, test: int = 32, size: int = 72, seed: int = 0) -> dict[str, int]:
    """Write the dataset to `out` (deterministic for a seed); returns the number of files per split."""
    out = Path(out)
    rng = {split: random.Random(f"{seed}:{split}") for split in ("trainA", "trainB", "test")}
    counts = {}
    for split, n in (("trainA", train), ("trainB", train), ("testA", test), ("testB", test)):
        (out / split).mkdir(parents=True, exist_ok=True)
        counts[split] = n
    for i in range(train):
        Image.fromarray(scene(rng["trainA"], size)).save(out / "trainA" / f"{i:05d}.png")
        Image.fromarray(to_domain_b(scene(rng["trainB"], size))).save(out / "trainB" / f"{i:05d}.png")
    for i in range(test):
        a = scene(rng["test"], size)
        Image.fromarray(a).save(out / "testA" / f"{i:05d}.png")
        Image.fromarray(to_domain_b(a)).save(out / "testB" / f"{i:05d}.png")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=400, help="images per training domain")
    parser.add_argument("--test", type=int, default=32, help="held-out pairs")
    parser.add_argument("--size", type=int, default=72, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = make_synthetic(args.out, args.train, args.test, args.size, args.seed)
    print(f"synthetic dataset in {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
