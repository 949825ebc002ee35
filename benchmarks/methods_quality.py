"""CycleGAN, CUT and FastCUT at equal training time on the synthetic set (ground truth known): held-out L1 and SSIM.

    python benchmarks/methods_quality.py [--steps 1000] [--methods cyclegan,cut,fastcut] [--seeds 0,1,2]
                                         [--calibrate 100] [--data data/synthetic] [--json out.json] [--smoke]

Trains `configs/quickstart.yaml` (`make demo`'s: the synthetic set at 64 px; make its data with `make demo` or
`datasets/synthetic.py`) once per method and seed; the config's settings win over the method presets (its
`optim.decay_start_frac` 0.8 over CUT's 0.5 and FastCUT's 0.75). The first method (CycleGAN) runs `--steps`
steps; its training time, summed from the steps/s the trainer logs (no model building, data-loader start-up or
evaluation), is the budget of that seed. Every other method runs as many steps as fit in that budget at the rate
it showed over a calibration run of `--calibrate` steps (after its first logging interval); the schedule is set
for those steps, so each run decays its learning rate to 0 as a real run would. Each row reports its own
measured training time against the budget. Each final checkpoint is evaluated on the same 32 held-out pairs:
A->B L1 and SSIM against the ground truth, next to returning the input. Prints a table per run and the means
over seeds; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import run_child, write_json

LOG_EVERY = 50  # Steps per logged rate in the measured runs.

ROOT = Path(__file__).resolve().parent.parent


def train(method: str, steps: int, run_dir: Path, data: Path, extra: list[str]) -> None:
    shards = data / "shards"
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           f"model.method={method}", f"train.steps={steps}", f"run_dir={run_dir}", "tracking.enabled=false",
           "checkpoint.resume=never", "report.sample_every_steps=0", "eval.every_steps=0",
           f"checkpoint.every_steps={steps}",
           *(f"data.{k}={shards}/{split}/*.tar" for k, split in (("train_a", "trainA"), ("train_b", "trainB"),
                                                                 ("test_a", "testA"), ("test_b", "testB"))),
           *extra]
    proc = run_child(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{method} training failed:\n{proc.stderr[-3000:]}")


def logged_rates(run_dir: Path) -> list[tuple[int, float]]:
    """(step, steps/s over the interval ending there) of every logged interval; an error when there is none."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [(line["step"], line["perf/steps_per_s"]) for line in lines if line.get("perf/steps_per_s")]
    if not rates:
        raise SystemExit(f"no steps/s logged in {run_dir / 'metrics.jsonl'}: the run logged no interval")
    return rates


def steady_rate(rates: list[tuple[int, float]]) -> float:
    """The median rate of the intervals after the first (which holds the loader's start and the warm-up)."""
    return statistics.median([rate for _, rate in rates[1:] or rates])


def training_seconds(run_dir: Path, steps: int) -> float:
    """Seconds of training steps: each logged interval's steps over its rate, the first at the steady rate, so
    that the loader's start-up counts no more here than in the calibration's rates. The trainer logs the last
    step too, so the intervals cover every step (counted as run: they are all finite-loss fp32 steps here)."""
    rates = logged_rates(run_dir)
    if rates[-1][0] != steps:
        raise SystemExit(f"{run_dir}: the last logged step is {rates[-1][0]}, not {steps}")
    seconds, done = rates[0][0] / steady_rate(rates), rates[0][0]
    for step, rate in rates[1:]:
        seconds, done = seconds + (step - done) / rate, step
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="the first method's steps (the demo's 1,000)")
    parser.add_argument("--methods", default="cyclegan,cut,fastcut", help="the first one sets the time budget")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed of each round")
    parser.add_argument("--calibrate", type=int, default=100, help="steps of each method to measure its rate")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "methods_quality.json")
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (CI)")
    args = parser.parse_args(argv)
    extra: list[str] = []
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    baseline = methods[0]
    log_every = LOG_EVERY
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.steps, args.calibrate, args.data, seeds, log_every = 4, 4, Path(tmp) / "data", [0], 1
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
        for method in methods[1:]:
            run_dir = Path(tmp) / f"cal-{method}"
            train(method, args.calibrate, run_dir, args.data,
                  [*extra, f"report.log_every_steps={max(1, args.calibrate // 4)}"])
            rates[method] = steady_rate(logged_rates(run_dir))
        rows = []
        print(f"{'seed':>4} {'method':>9}{'steps':>7}{'train s':>9}{'/budget':>8}{'L1':>8}{'x lower':>8}{'SSIM':>8}"
              f"  (input: L1, SSIM)")
        for seed in seeds:
            budget = None
            for method in methods:
                if budget is None:
                    steps = args.steps
                else:  # A bad calibration must not train for hours.
                    steps = max(1, min(round(budget * rates[method]), 10 * args.steps))
                run_dir = Path(tmp) / f"{method}-{seed}"
                train(method, steps, run_dir, args.data,
                      [*extra, f"train.seed={seed}", f"report.log_every_steps={log_every}"])
                seconds = training_seconds(run_dir, steps)
                budget = seconds if budget is None else budget
                result = json.loads((run_dir / "eval.json").read_text())["results"]["AtoB"]
                rows.append({"seed": seed, "method": method, "steps": steps, "seconds": seconds,
                             "of_budget": seconds / budget, "l1": result["l1"], "l1_identity": result["l1_identity"],
                             "ssim": result["ssim"], "ssim_identity": result["ssim_identity"],
                             "ratio": result["l1_identity"] / result["l1"]})
                row = rows[-1]
                print(f"{seed:>4} {method:>9}{steps:>7}{seconds:>9.1f}{row['of_budget']:>8.2f}{row['l1']:>8.4f}"
                      f"{row['ratio']:>7.1f}x{row['ssim']:>8.4f}  ({row['l1_identity']:.4f}, "
                      f"{row['ssim_identity']:.4f})", flush=True)
    means = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        means[method] = {key: statistics.mean(r[key] for r in mine)
                         for key in ("steps", "seconds", "of_budget", "l1", "ratio", "ssim")}
        for key in ("l1", "ssim"):  # The seeds' ranges, which the README's table quotes beside the means.
            means[method].update({f"{key}_min": min(r[key] for r in mine), f"{key}_max": max(r[key] for r in mine)})
        m = means[method]
        print(f"mean {method:>9}{m['steps']:>7.0f}{m['seconds']:>9.1f}{m['of_budget']:>8.2f}{m['l1']:>8.4f}"
              f"{m['ratio']:>7.1f}x{m['ssim']:>8.4f}  (over {len(mine)} seed(s): L1 {m['l1_min']:.4f} to "
              f"{m['l1_max']:.4f}, SSIM {m['ssim_min']:.4f} to {m['ssim_max']:.4f})")
    rates[baseline] = means[baseline]["steps"] / means[baseline]["seconds"]
    write_json(args.json, {"rows": rows, "means": means, "rates_steps_per_s": rates, "baseline": baseline})
    return 0


if __name__ == "__main__":
    sys.exit(main())
