"""CycleGAN, CUT and FastCUT at equal wall-clock on the synthetic set (ground truth known): held-out L1 and SSIM.

    python benchmarks/methods_quality.py [--steps 1500] [--methods cyclegan,cut,fastcut] [--calibrate 40]
                                         [--data data/synthetic] [--json out.json] [--smoke]

Trains `configs/quickstart.yaml` (`make demo`'s: the synthetic set at 64 px; make its data with `make demo` or
`datasets/synthetic.py`) once per method. CycleGAN runs `--steps` steps; every other method runs as many steps as
fit in the same time, by the steps/s the trainer logs over a calibration run of `--calibrate` steps of each
(after its first logging interval). Each final checkpoint is evaluated on the same 32 held-out pairs: A->B
L1 and SSIM against the ground truth, next to returning the input. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(method: str, steps: int, run_dir: Path, data: Path, extra: list[str]) -> float:
    """Train and return the wall-clock seconds of the training command."""
    shards = data / "shards"
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           f"model.method={method}", f"train.steps={steps}", f"run_dir={run_dir}", "tracking.enabled=false",
           "checkpoint.resume=never", "report.sample_every_steps=0", "eval.every_steps=0",
           f"checkpoint.every_steps={steps}",
           *(f"data.{k}={shards}/{split}/*.tar" for k, split in (("train_a", "trainA"), ("train_b", "trainB"),
                                                                 ("test_a", "testA"), ("test_b", "testB"))),
           *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} training failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="CycleGAN's steps (the demo's)")
    parser.add_argument("--methods", default="cyclegan,cut,fastcut")
    parser.add_argument("--calibrate", type=int, default=40, help="steps of each method to measure its rate")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "methods_quality.json")
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (CI)")
    args = parser.parse_args(argv)
    extra: list[str] = []
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.steps, args.calibrate, args.data = 4, 4, Path(tmp) / "data"
            subprocess.run([sys.executable, str(ROOT / "datasets" / "synthetic.py"), str(args.data / "images"),
                            "--train", "8", "--test", "4", "--size", "40"], check=True, capture_output=True)
            subprocess.run([sys.executable, "-m", "pipeline.shards", str(args.data / "images"),
                            str(args.data / "shards"), "--maxcount", "8"], check=True, capture_output=True, cwd=ROOT)
            extra = ["model.ngf=4", "model.ndf=4", "data.load_size=36", "data.crop_size=32", "data.workers=0",
                     "data.shuffle_buffer=8"]
        if not (args.data / "shards" / "testA").is_dir():
            raise SystemExit(f"no synthetic shards under {args.data}: run `make demo` (or datasets/synthetic.py and "
                             "pipeline.shards) first")
        # Rates: the steps/s the trainer logs over a short run, after its first interval (start-up, warm-up).
        rates = {}
        every = max(1, args.calibrate // 4)
        for method in methods:
            run_dir = Path(tmp) / f"cal-{method}"
            train(method, args.calibrate, run_dir, args.data, [*extra, f"report.log_every_steps={every}"])
            logged = [json.loads(line).get("perf/steps_per_s") for line in
                      (run_dir / "metrics.jsonl").read_text().splitlines()]
            logged = [r for r in logged if r] or [1.0]
            rates[method] = statistics.median(logged[1:] or logged)
        rows = []
        for method in methods:
            share = min(rates[method] / rates["cyclegan"], 10.0)  # A bad calibration must not train for hours.
            steps = args.steps if method == "cyclegan" else max(1, round(args.steps * share))
            run_dir = Path(tmp) / method
            seconds = train(method, steps, run_dir, args.data, extra)
            result = json.loads((run_dir / "eval.json").read_text())["results"]["AtoB"]
            rows.append({"method": method, "steps": steps, "seconds": seconds, "steps_per_s": rates[method],
                         "l1": result["l1"], "l1_identity": result["l1_identity"], "ssim": result["ssim"],
                         "ssim_identity": result["ssim_identity"], "ratio": result["l1_identity"] / result["l1"]})
            print(f"{method:>9}: {steps:>5} steps in {seconds:6.1f} s | L1 {result['l1']:.4f} (input "
                  f"{result['l1_identity']:.4f}, {rows[-1]['ratio']:.1f}x lower) | SSIM {result['ssim']:.4f} "
                  f"(input {result['ssim_identity']:.4f})", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "rates_steps_per_s": rates}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
