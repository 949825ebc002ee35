"""A colourisation set: grayscale domain A, colour domain B, the colour truth of held-out A kept for evaluation.

`python datasets/colourise.py OUT [--source photos|synthetic] [--train 400] [--test 48] [--size 64] [--seed 0]`
writes OUT/trainA (8-bit grayscale PNG: one channel), trainB (RGB PNG), testA (grayscale) and testB (the colour
originals of testA, under the same names), in the reference folder layout.

- `photos` (default): random crops of real photographs shipped with scikit-image (nothing is downloaded):
  astronaut, coffee, rocket, the left motorcycle, the Hubble deep field and the retina for training; chelsea,
  the right motorcycle and the immunohistochemistry slide held out (unseen scenes). A's crops and B's crops are
  drawn separately (unpaired).
- `synthetic`: the scenes of datasets/synthetic.py (needs nothing but numpy and Pillow; colours are random, so
  there is little to learn beyond their distribution: a smoke test, not a benchmark).

Grayscale is BT.601 luma (PIL's "L"). Train with configs/colourise.yaml (model.channels_a=1, loss.lambda_idt=0);
the held-out error is reported next to that of the gray input replicated to 3 channels (evaluation's identity).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina")
HELD_OUT_PHOTOS = ("chelsea", "motorcycle_right", "immunohistochemistry")


def _photos(names: tuple[str, ...], short_side: int) -> list[Image.Image]:
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("--source photos needs scikit-image (pip install scikit-image; its sample photographs "
                         "come with it), or use --source synthetic") from None
    out = []
    for name in names:
        if name.startswith("motorcycle_"):
            array = data.stereo_motorcycle()[0 if name.endswith("left") else 1]
        else:
            array = getattr(data, name)()
        img = Image.fromarray(array[..., :3] if array.ndim == 3 else np.stack([array] * 3, -1))
        scale = short_side / min(img.size)
        out.append(img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC))
    return out


def _crop(images: list[Image.Image], size: int, rng: random.Random) -> Image.Image:
    img = images[rng.randrange(len(images))]
    left, top = rng.randrange(img.width - size + 1), rng.randrange(img.height - size + 1)
    crop = img.crop((left, top, left + size, top + size))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def make_colourise(out: Path, source: str = "photos", train: int = 400, test: int = 48, size: int = 64,
                   seed: int = 0) -> dict[str, int]:
    """Write the set to `out` (deterministic for a seed); returns the number of files per split."""
    out = Path(out)
    rng = {split: random.Random(f"{seed}:{split}") for split in ("trainA", "trainB", "test")}
    if source == "photos":
        train_photos, held = _photos(TRAIN_PHOTOS, 3 * size), _photos(HELD_OUT_PHOTOS, 3 * size)

        def colour(split: str, held_out: bool = False) -> Image.Image:
            return _crop(held if held_out else train_photos, size, rng[split])
    elif source == "synthetic":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from synthetic import scene, to_domain_b

        def colour(split: str, held_out: bool = False) -> Image.Image:
            return Image.fromarray(to_domain_b(scene(rng[split], size)))
    else:
        raise ValueError(f"unknown source {source!r}: photos or synthetic")
    counts = {"trainA": train, "trainB": train, "testA": test, "testB": test}
    for split in counts:
        (out / split).mkdir(parents=True, exist_ok=True)
    for i in range(train):
        colour("trainA").convert("L").save(out / "trainA" / f"{i:05d}.png")
        colour("trainB").save(out / "trainB" / f"{i:05d}.png")
    for i in range(test):
        truth = colour("test", held_out=True)
        truth.convert("L").save(out / "testA" / f"{i:05d}.png")
        truth.save(out / "testB" / f"{i:05d}.png")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", choices=("photos", "synthetic"), default="photos")
    parser.add_argument("--train", type=int, default=400, help="images per training domain")
    parser.add_argument("--test", type=int, default=48, help="held-out pairs")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = make_colourise(args.out, args.source, args.train, args.test, args.size, args.seed)
    print(f"colourisation set in {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
