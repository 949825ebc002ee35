"""Colour and intensity tasks on real photographs: do the networks learn a global colour mapping?

    python benchmarks/colour_tasks.py [--steps 1500] [--size 64] [--seeds 0,1,2]
        [--transforms exposure,cast,mix,gamma,stain] [--variants reference,colour,transfer]
        [--json benchmarks/results/colour_tasks.json] [--merge EARLIER.json] [--smoke]

Real photographs available offline (scikit-image's sample images, installed with it; nothing is downloaded):
astronaut, coffee, rocket, the left motorcycle, the Hubble deep field and the retina for training; chelsea (the
cat), the right motorcycle and the immunohistochemistry slide held out, so the evaluation is on unseen scenes.
Domain A is random SIZE px crops of the training photos, domain B other crops of them through a global transform
(unpaired); the held-out crops' truth is the same transform of each crop. Transforms:
exposure (x 0.6 in linear light), cast (a warm white balance), mix (a channel-mixing matrix), gamma (x^0.5), stain
(dark structures turned blue-purple and light ones pink, as H&E staining does).

Each (transform, variant, seed) trains the pipeline itself (`pipeline.train.run`) for STEPS steps and reports the
held-out L1 and SSIM against the truth next to identity's (the input unchanged), and the cycle loss curve. Variants:
`reference` (the paper's networks and settings: model.g_variant=reference, d_variant=reference, lambda_idt 0.5) and
`colour` (configs/colour.yaml: the colour networks, starting as the colour transfer between the domains),
`colour-identity` (the same, starting as the identity); and `transfer`, no network: the linear colour transfer that
matches A's pixel mean and covariance to B's (one row, it has no seed). Figures are means and (min-max) over the
seeds. `--merge` keeps the rows of an earlier JSON for the (transform, variant) pairs this run does not train.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_json  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402

TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina")
HELD_OUT_PHOTOS = ("chelsea", "motorcycle_right", "immunohistochemistry")
TRANSFORMS = ("exposure", "cast", "mix", "gamma", "stain")
MIX = np.array([[0.7, 0.25, 0.05], [0.15, 0.7, 0.15], [0.05, 0.3, 0.65]])


def _linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def transform(name: str, image: np.ndarray) -> np.ndarray:
    """A global colour transform of an (H, W, 3) float image in [0, 1]."""
    if name == "exposure":
        return _srgb(0.6 * _linear(image))
    if name == "cast":
        return np.clip(image * np.array([1.12, 1.0, 0.78]) + np.array([0.03, 0.0, -0.02]), 0, 1)
    if name == "mix":
        return np.clip(image @ MIX.T, 0, 1)
    if name == "gamma":
        return image**0.5
    if name == "stain":
        darkness = 1 - image.mean(axis=2, keepdims=True)
        purple, pink = np.array([0.35, 0.2, 0.55]), np.array([0.95, 0.75, 0.85])
        tint = darkness * purple + (1 - darkness) * pink
        return np.clip(0.45 * image + 0.55 * tint * (1.2 - 0.4 * darkness), 0, 1)
    raise ValueError(f"unknown transform {name!r}")


def photos(names: tuple[str, ...], short_side: int) -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in names:
        if name.startswith("motorcycle_"):  # A stereo pair: (left, right, disparity).
            image = data.stereo_motorcycle()[0 if name.endswith("left") else 1]
        else:
            image = getattr(data, name)()
        img = Image.fromarray(image[..., :3] if image.ndim == 3 else np.stack([image] * 3, -1))
        scale = short_side / min(img.size)
        out.append(np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)))
    return out


def crops(images: list[np.ndarray], count: int, size: int, rng: random.Random) -> list[np.ndarray]:
    """`count` random crops, as many of each photo as can be (in a random order). Drawing the photo at random for
    each crop would give A and B different shares of each photo: for the channel mix, A's mean red was 0.035 above
    B's before the transform, against the transform's own -0.05, and an unpaired objective learns that difference
    as part of the mapping. Balanced, the two domains' contents differ by less than 0.01."""
    order = [i % len(images) for i in range(count)]
    rng.shuffle(order)
    out = []
    for index in order:
        image = images[index]
        top, left = rng.randrange(image.shape[0] - size + 1), rng.randrange(image.shape[1] - size + 1)
        crop = image[top : top + size, left : left + size]
        out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return out


def save(images: list[np.ndarray], folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / f"{i:05d}.png")


def make_task(root: Path, name: str, args: argparse.Namespace) -> dict[str, str]:
    """Shards of A and B (unpaired) and held-out folders (A, and its truth under the same names as B)."""
    rng = random.Random(f"task:{name}")
    train, held = photos(TRAIN_PHOTOS, 3 * args.size), photos(HELD_OUT_PHOTOS, 3 * args.size)
    a = crops(train, args.images, args.size, rng)
    b = [_to8(transform(name, c / 255.0)) for c in crops(train, args.images, args.size, rng)]
    test = crops(held, args.held_out, args.size, rng)
    save(a, root / "images" / "trainA")
    save(b, root / "images" / "trainB")
    save(test, root / "images" / "testA")
    save([_to8(transform(name, c / 255.0)) for c in test], root / "images" / "testB")
    write_shards(root / "images", root / "shards", splits=["trainA", "trainB"], maxcount=256)
    return {"train_a": str(root / "shards" / "trainA"), "train_b": str(root / "shards" / "trainB"),
            "test_a": str(root / "images" / "testA"), "test_b": str(root / "images" / "testB")}


def _to8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


VARIANTS = {
    # The paper's networks with the paper's loss weights (lambda_idt 0.5), at the demo's learning rate.
    "reference": (None, ["model.g_variant=reference", "model.d_variant=reference", "loss.lambda_idt=0.5"]),
    "colour": (ROOT / "configs" / "colour.yaml", []),
    # The preset's networks starting as the identity instead of the colour transfer (the preset of the last stop).
    "colour-identity": (ROOT / "configs" / "colour.yaml", ["model.colour_start=identity"]),
}


def _load(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("*.png"))]) / 255.0


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(m)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def colour_transfer(task: dict[str, str]) -> dict:
    """The classical answer, without a network: the linear Monge-Kantorovich colour transfer (Pitie and Kokaram
    2007), the affine map that carries A's pixel mean and covariance onto B's, fitted on the training domains' pixels
    (unpaired, as the networks see them) and applied to each held-out A crop. A floor for global transforms: it can
    represent exposure, cast and mix nearly exactly, and gamma and stain only as their best affine fit."""
    import torch

    from pipeline.eval.metrics.paired import ssim

    t0 = time.perf_counter()
    images = Path(task["test_a"]).parent
    a, b = (_load(images / d).reshape(-1, 3) for d in ("trainA", "trainB"))
    root_a = _psd_sqrt(np.cov(a.T))
    inverse = np.linalg.pinv(root_a)
    mapping = inverse @ _psd_sqrt(root_a @ np.cov(b.T) @ root_a) @ inverse
    test, truth = _load(Path(task["test_a"])), _load(Path(task["test_b"]))
    moved = np.round(np.clip((test - a.mean(0)) @ mapping.T + b.mean(0), 0, 1) * 255) / 255

    def signed(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x * 2 - 1).permute(0, 3, 1, 2)

    return {"l1": float(2 * np.abs(moved - truth).mean()), "l1_identity": float(2 * np.abs(test - truth).mean()),
            "ssim": float(ssim(signed(moved), signed(truth)).mean()),
            "ssim_identity": float(ssim(signed(test), signed(truth)).mean()),
            "seconds": time.perf_counter() - t0, "cycle_curve": []}


def train_once(task: dict[str, str], variant: str, seed: int, run_dir: Path, args: argparse.Namespace) -> dict:
    from pipeline.train import loop

    config, extra = VARIANTS[variant]
    overrides = [f"data.{k}={v}" for k, v in task.items()] + [
        f"run_dir={run_dir}", f"train.steps={args.steps}", f"train.seed={seed}", "train.device=cpu",
        "model.generator=resnet_6blocks", f"model.ngf={args.width}", f"model.ndf={args.width}",
        f"data.load_size={args.size}", f"data.crop_size={args.size}", "data.workers=1", "data.shuffle_buffer=256",
        "tracking.enabled=false", "report.sample_every_steps=0", "report.log_every_steps=50",
        "report.health_after_steps=0", "checkpoint.every_steps=0", "checkpoint.resume=never",
        "eval.paired=true", f"eval.every_steps={args.eval_every or args.steps}", "eval.features=''", *extra]
    cfg = load_config([config] if config else [], overrides)
    curve = []  # Each evaluation's held-out L1 (run_dir/eval.json keeps the last only).
    evaluate = loop.held_out_eval

    def recording(*a, **k):
        values = evaluate(*a, **k)
        curve.append(values["AtoB/l1"])
        return values

    loop.held_out_eval = recording
    try:
        t0 = time.perf_counter()
        result = loop.run(cfg)
        seconds = time.perf_counter() - t0
    finally:
        loop.held_out_eval = evaluate
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = result.evaluation
    return {"l1": ev["AtoB/l1"], "l1_identity": ev["AtoB/l1_identity"], "ssim": ev["AtoB/ssim"],
            "ssim_identity": ev["AtoB/ssim_identity"], "seconds": seconds,
            "cycle_curve": [[x["step"], x["loss/G_ab/cycle"] + x["loss/G_ba/cycle"]] for x in lines
                            if "loss/G_ab/cycle" in x],
            "l1_curve": [[step, l1] for step, l1 in zip(range(cfg.eval.every_steps, args.steps + 1,
                                                               cfg.eval.every_steps), curve)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="model.ngf and model.ndf")
    parser.add_argument("--images", type=int, default=400, help="crops per training domain")
    parser.add_argument("--held-out", type=int, default=48)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--transforms", default=",".join(TRANSFORMS))
    parser.add_argument("--variants", default="reference,colour,transfer")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "colour_tasks.json")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also evaluate every N steps (the rows' l1_curve); default: at the end only")
    parser.add_argument("--merge", type=Path, help="an earlier JSON whose other (transform, variant) rows are kept")
    parser.add_argument("--smoke", action="store_true", help="a tiny case for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.size, args.width, args.images, args.held_out = 6, 32, 4, 16, 4
        args.seeds, args.transforms = "0", "cast"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows, seeds = [], [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.transforms.split(","):
            task = make_task(Path(tmp) / name, name, args)
            for variant in args.variants.split(","):
                for seed in seeds[:1] if variant == "transfer" else seeds:  # The colour transfer has no seed.
                    run_dir = Path(tmp) / name / f"{variant}-{seed}"
                    result = (colour_transfer(task) if variant == "transfer"
                              else train_once(task, variant, seed, run_dir, args))
                    row = {"transform": name, "variant": variant, "seed": seed, "steps": args.steps, **result}
                    shutil.rmtree(run_dir, ignore_errors=True)
                    rows.append(row)
                    curve = row["cycle_curve"]
                    cycle = f", cycle {curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else ""
                    print(f"{name:8s} {variant:9s} seed {seed}: L1 {row['l1']:.4f} (identity {row['l1_identity']:.4f})"
                          f", SSIM {row['ssim']:.3f} (identity {row['ssim_identity']:.3f}){cycle}, "
                          f"{row['seconds']:.0f} s", flush=True)
    if args.merge:
        ran = {(r["transform"], r["variant"]) for r in rows}
        rows = [r for r in json.loads(args.merge.read_text())["rows"] if (r["transform"], r["variant"]) not in ran
                ] + rows
        order = [*TRANSFORMS, *sorted({r["transform"] for r in rows} - set(TRANSFORMS))]
        variants = [*VARIANTS, "transfer", *sorted({r["variant"] for r in rows} - {*VARIANTS, "transfer"})]
        rows.sort(key=lambda r: (order.index(r["transform"]), variants.index(r["variant"])))
    summary = summarise(rows)
    for line in summary:
        print(f"{line['transform']:8s} {line['variant']:9s} L1 {line['l1']:.4f} ({line['l1_min']:.4f}-"
              f"{line['l1_max']:.4f}), identity {line['l1_identity']:.4f}; SSIM {line['ssim']:.3f}, identity "
              f"{line['ssim_identity']:.3f}; below identity on {line['below_identity']}/{line['seeds']} seeds")
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "summary": summary})
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["transform"], r["variant"]) for r in rows):
        group = [r for r in rows if (r["transform"], r["variant"]) == key]
        l1 = [r["l1"] for r in group]
        out.append({"transform": key[0], "variant": key[1], "seeds": len(group), "l1": float(np.mean(l1)),
                    "l1_min": min(l1), "l1_max": max(l1), "l1_identity": group[0]["l1_identity"],
                    "ssim": float(np.mean([r["ssim"] for r in group])), "ssim_identity": group[0]["ssim_identity"],
                    "below_identity": sum(r["l1"] < r["l1_identity"] for r in group)})
    return out


if __name__ == "__main__":
    sys.exit(main())
