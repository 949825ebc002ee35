"""Data beyond 8-bit RGB, trained: grayscale -> colour (CycleGAN and FastCUT) and a 16-bit single-channel pair.

    python benchmarks/beyond_rgb.py [--steps 1000] [--seeds 0] [--tasks colourise,scanner]
        [--methods cyclegan,fastcut] [--json benchmarks/results/beyond_rgb.json] [--smoke]

- colourise: datasets/colourise.py on real photographs (scikit-image's samples; held-out scenes): domain A is
  8-bit grayscale (one channel), B colour. The held-out error against the colour truth is reported next to that
  of the gray input replicated to 3 channels (evaluation's identity). configs/colourise.yaml.
- scanner: datasets/scanner.py, 16-bit PNG both sides, a known intensity curve (configs/scanner.yaml). The error
  is also given in 16-bit levels (`l1_units`).

Each (task, method, seed) trains the pipeline itself (`pipeline.train.run`) from its shards for STEPS steps.
FastCUT trains on the scanner pair too when asked (`--methods`); figures are held-out L1 ([-1, 1] units) and
SSIM against the truth, next to the input's.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "datasets"))

from benchmarks._report import write_json  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402

CONFIGS = {"colourise": ROOT / "configs" / "colourise.yaml", "scanner": ROOT / "configs" / "scanner.yaml"}


def make_task(root: Path, task: str, args: argparse.Namespace) -> dict[str, str]:
    if task == "colourise":
        from colourise import make_colourise

        make_colourise(root / "images", "synthetic" if args.smoke else "photos", args.images, args.held_out,
                       args.size)
    else:
        from scanner import make_scanner

        make_scanner(root / "images", args.images, args.held_out, args.size)
    write_shards(root / "images", root / "shards", maxcount=256)
    return {f"data.{key}": str(root / "shards" / split / "*.tar")
            for key, split in (("train_a", "trainA"), ("train_b", "trainB"), ("test_a", "testA"),
                               ("test_b", "testB"))}


def train_once(task: str, shards: dict[str, str], method: str, seed: int, run_dir: Path,
               args: argparse.Namespace) -> dict:
    from pipeline.train.loop import run

    overrides = [f"{k}={v}" for k, v in shards.items()] + [
        f"run_dir={run_dir}", f"model.method={method}", f"train.steps={args.steps}", f"train.seed={seed}",
        "train.device=cpu", f"data.load_size={args.size}", f"data.crop_size={args.size}", "tracking.enabled=false",
        "report.sample_every_steps=0", "checkpoint.every_steps=0", "checkpoint.resume=never",
        f"eval.every_steps={args.steps}", "report.health_after_steps=0", f"report.log_every_steps={args.log_every}"]
    if args.smoke:
        overrides += ["model.ngf=4", "model.ndf=4"]
    cfg = load_config([CONFIGS[task]], overrides)
    t0 = time.perf_counter()
    result = run(cfg)
    ev = result.evaluation
    row = {"l1": ev["AtoB/l1"], "l1_identity": ev["AtoB/l1_identity"], "ssim": ev["AtoB/ssim"],
           "ssim_identity": ev["AtoB/ssim_identity"], "seconds": time.perf_counter() - t0}
    if "AtoB/l1_units" in ev:
        row.update(l1_units=ev["AtoB/l1_units"], l1_units_identity=ev["AtoB/l1_units_identity"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=400, help="images per training domain")
    parser.add_argument("--held-out", type=int, default=48)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--tasks", default="colourise,scanner")
    parser.add_argument("--methods", default="cyclegan,fastcut")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "beyond_rgb.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny case for CI (synthetic colourisation)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.size, args.images, args.held_out, args.log_every = 4, 32, 8, 4, 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            shards = make_task(Path(tmp) / task, task, args)
            for method in args.methods.split(","):
                for seed in map(int, args.seeds.split(",")):
                    row = {"task": task, "method": method, "seed": seed, "steps": args.steps,
                           **train_once(task, shards, method, seed, Path(tmp) / task / f"{method}-{seed}", args)}
                    rows.append(row)
                    units = (f"; in 16-bit levels {row['l1_units']:.0f} (input {row['l1_units_identity']:.0f})"
                             if "l1_units" in row else "")
                    print(f"{task:9s} {method:8s} seed {seed}: held-out L1 {row['l1']:.4f} (input "
                          f"{row['l1_identity']:.4f}, {row['l1_identity'] / max(row['l1'], 1e-12):.2f}x), SSIM "
                          f"{row['ssim']:.3f} (input {row['ssim_identity']:.3f}){units}, {row['seconds']:.0f} s",
                          flush=True)
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
