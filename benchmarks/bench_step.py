"""Train-step throughput: our step against the reference-style step, in one run, per setting.

    python benchmarks/bench_step.py [--cases quickstart,res6_128,res9_256] [--precisions fp32,bf16]
        [--batches 1,4] [--channels-last off,on] [--compile off,on] [--methods cyclegan,cut,fastcut]
        [--iters 3] [--json out.json] [--smoke]

Prints a table (ms/iteration after warm-up, iterations/s, images/s, model TFLOP per iteration, achieved
TFLOP/s and, on a GPU with a known peak, MFU) and writes it as JSON. The reference-style row of each case is the
same maths written as the reference implementation writes it (tests/support/reference_step.py: one call per term,
torch's InstanceNorm kernel, fp32, eager). Shared machines are noisy: the iterations of all rows of a case are
interleaved in one process, each is timed on its own, and the table shows the fastest (the least disturbed)
and the median; "speedup" is the ratio of the fastest iterations and "paired" the median over rounds of the
ratio within a round. With several `--methods`, "vs cyclegan" is each row's paired ratio of its step time to the
CycleGAN step's of the same setting (FastCUT's paper claims about 0.4x).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config  # noqa: E402
from pipeline.engine.dist import DistInfo  # noqa: E402
from pipeline.gan.cyclegan import build_objective  # noqa: E402
from pipeline.train.build import build_components  # noqa: E402
from tests.support.reference_step import ReferenceStyleStep, reference_adam  # noqa: E402

CASES = {
    "quickstart": (["model.generator=resnet_6blocks", "model.ngf=16", "model.ndf=16", "loss.lambda_idt=0"], 64),
    "res6_128": (["model.generator=resnet_6blocks"], 128),
    "res9_256": (["model.generator=resnet_9blocks"], 256),
    "smoke": (["model.generator=resnet_6blocks", "model.ngf=4", "model.ndf=4"], 32),
}
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of GPUs whose MFU we report.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(case: str, impl: str, precision: str, channels_last: bool, compiled: bool, device: torch.device,
              extra: tuple[str, ...] = ()):
    """(step, crop) of one setting; `extra` are more config overrides (e.g. perf.compile_mode=reduce-overhead)."""
    overrides, crop = CASES[case]
    overrides = [*overrides, f"train.precision={precision}", f"perf.channels_last={channels_last}",
                 f"perf.compile={compiled}", f"train.device={device.type}", *extra]
    if impl == "reference":
        overrides += ["perf.fused_calls=false", "perf.instance_norm_kernel=instance_norm"]
    cfg = load_config([], overrides)
    parts = build_components(cfg, DistInfo(), device)
    if impl == "reference":
        gens, discs = parts.gens, parts.discs
        return ReferenceStyleStep(gens, discs, build_objective(cfg.loss), reference_adam(gens.parameters()),
                                  reference_adam(discs.parameters()), parts.step.pools.a, parts.step.pools.b), crop
    if parts.ema is not None:
        # The trainer updates the generators' average after each applied step: time it as part of the step.
        ema = parts.ema

        def step_with_ema(real_a, real_b):
            result = parts.step(real_a, real_b)
            ema.update(ema.start_step + 1 if ema.started else ema.start_step)
            return result

        step_with_ema.ema = ema  # type: ignore[attr-defined]  # For timing the update on its own.
        return step_with_ema, crop
    return parts.step, crop


def measure(steps: list, crop: int, batch: int, device: torch.device, iters: int,
            warmups: list[int]) -> list[tuple[list[float], float]]:
    """(seconds of each timed iteration, model FLOPs per iteration) of each step.

    The steps' iterations are interleaved (round i times every step once, starting at step i mod n), so a
    neighbour's load on a shared machine slows all of them alike instead of whichever ran during it.
    """
    g = torch.Generator().manual_seed(0)
    real_a = (torch.rand(batch, 3, crop, crop, generator=g) * 2 - 1).to(device)
    real_b = (torch.rand(batch, 3, crop, crop, generator=g) * 2 - 1).to(device)
    flops = []
    for step, warmup in zip(steps, warmups):
        with FlopCounterMode(display=False) as counter:
            step(real_a, real_b)
        flops.append(float(counter.get_total_flops()))
        for _ in range(warmup):
            step(real_a, real_b)
    times: list[list[float]] = [[] for _ in steps]
    for i in range(iters):
        for j in [(i + k) % len(steps) for k in range(len(steps))]:
            sync(device)
            t0 = time.perf_counter()
            steps[j](real_a, real_b)
            sync(device)
            times[j].append(time.perf_counter() - t0)
    return list(zip(times, flops))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="quickstart,res6_128,res9_256")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--channels-last", default="off")
    parser.add_argument("--compile", default="off")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="cyclegan", help="model.method values of our rows")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-style rows")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/step.json"))
    parser.add_argument("--smoke", action="store_true", help="a tiny case, 1 iteration: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.iters, args.warmup = "smoke", 1, 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    onoff = {"off": [False], "on": [True], "both": [False, True]}
    peak = peak_tflops(device)
    rows = []
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
          f", torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'case':<11}{'impl':<10}{'method':<9}{'prec':<6}{'batch':>5}{'NHWC':>6}{'comp':>6}{'ms/it':>10}" \
             f"{'it/s':>8}" \
             f"{'img/s':>8}{'median':>9}{'TFLOP/it':>10}{'TFLOP/s':>9}{'MFU':>7}{'speedup':>9}{'paired':>8}" \
             f"{'vs cyclegan':>12}"
    print(header)
    for case in args.cases.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            variants = [] if args.no_reference else [("reference", "fp32", False, False, "cyclegan")]
            variants += [("ours", *v) for v in itertools.product(args.precisions.split(","),
                                                                 onoff[args.channels_last], onoff[args.compile],
                                                                 args.methods.split(","))]
            built = [make_step(case, impl, precision, nhwc, comp, device, (f"model.method={method}",))
                     for impl, precision, nhwc, comp, method in variants]
            crop = built[0][1]
            warmups = [args.warmup + 2 * comp for *_, comp, _ in variants]
            measured = measure([step for step, _ in built], crop, batch, device, args.iters, warmups)
            baseline = min(measured[0][0]) if not args.no_reference else None
            by_setting = {(impl, p, n, c): times for (impl, p, n, c, m), (times, _) in zip(variants, measured)
                          if m == "cyclegan"}
            for (impl, precision, nhwc, comp, method), (times, flops) in zip(variants, measured):
                # The median of per-round ratios pairs iterations run seconds apart: the steadiest estimate.
                paired = statistics.median(r / t for r, t in zip(measured[0][0], times)) if baseline else None
                cyclegan = by_setting.get((impl, precision, nhwc, comp))
                vs = (statistics.median(t / c for t, c in zip(times, cyclegan))
                      if cyclegan is not None and len(args.methods.split(",")) > 1 else None)
                rows.append(dict(case=case, impl=impl, method=method, precision=precision, batch=batch,
                                 channels_last=nhwc, compile=comp, seconds=min(times),
                                 median_s=statistics.median(times), flops=flops,
                                 speedup=baseline / min(times) if baseline else None, paired_speedup=paired,
                                 vs_cyclegan=vs))
            del built
            for row in rows:
                if row.get("printed"):
                    continue
                row["printed"] = True
                row["tflops_per_s"] = row["flops"] / row["seconds"] / 1e12
                row["mfu"] = row["tflops_per_s"] / peak if peak else None
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
                speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
                paired = f"{row['paired_speedup']:.2f}x" if row.get("paired_speedup") else "-"
                vs = f"{row['vs_cyclegan']:.2f}x" if row.get("vs_cyclegan") else "-"
                print(f"{row['case']:<11}{row['impl']:<10}{row['method']:<9}{row['precision']:<6}{row['batch']:>5}"
                      f"{'on' if row['channels_last'] else 'off':>6}{'on' if row['compile'] else 'off':>6}"
                      f"{row['seconds'] * 1e3:>10.1f}{1 / row['seconds']:>8.2f}"
                      f"{2 * row['batch'] / row['seconds']:>8.1f}{row['median_s'] * 1e3:>9.0f}"
                      f"{row['flops'] / 1e12:>10.3f}{row['tflops_per_s']:>9.3f}{mfu:>7}{speed:>9}{paired:>8}{vs:>12}",
                      flush=True)
    for row in rows:
        row.pop("printed", None)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                     "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
