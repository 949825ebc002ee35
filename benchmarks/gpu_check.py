"""The GPU check: one command that proves the CUDA path and measures the GPU step (`make gpu-check`).

    python benchmarks/gpu_check.py [--budget-s 460] [--json benchmarks/results/gpu_check.json] [--trace T.json]

Five parts, in this order, each inside one time budget (8 minutes on one H100/H200 with the default; what does
not fit is reported as skipped for time, never dropped silently):

1. tests: the `gpu`-marked tests (tests/test_gpu.py), each test's outcome and time.
2. step: the training step at 256 px, resnet_9blocks, eager: ms/step, images/s (A and B images), MFU against the
   device's dense bf16 peak, peak GPU memory, for fp32 (TF32 convolutions, torch's default) and bf16 at batch
   1/4/8; our step against the reference-style step (tests/support/reference_step.py: one call per loss term,
   torch's InstanceNorm kernel, fp32) at each batch; InstanceNorm's two kernels; channels_last; fp16.
3. profile: torch.profiler over steps of the fastest eager batch-1 setting: the top kernels by GPU time,
   kernels launched per step, and the host-overhead share (the part of the wall time the GPU is idle).
4. loader: the training loader (286 px JPEG shards, crop 256, pinned memory) with 4/8/16 workers against the
   images/s the fastest step consumes.
5. compile: torch.compile (default mode, and reduce-overhead: CUDA graphs) at batch 1 and 8, each in its own
   process under a timeout: ms/step and what the compile cost in seconds.

Without CUDA the same command runs everything that does not need it, on a small case (32 px, ngf = ndf = 4)
so that CI keeps the code path alive: the gpu tests are collected and skipped, the step rows run on the CPU,
compile rows use the aot_eager backend (tracing, no code generation), and CUDA graphs are reported as skipped.
One table is printed at the end; the JSON holds every figure and the list of what was skipped and why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_data, bench_step  # noqa: E402
from benchmarks._report import run_child  # noqa: E402

GIB = 2**30
# Seconds of the budget (on CUDA) kept for the eager rows, profile and loader, and for the first compiled setting
# (a cold inductor compile of resnet_9blocks' four networks, forward and backward, at 256 px).
MEASURE_S = 125.0
PROFILE_LOADER_S = 60.0
COMPILE_RESERVE_S = 150.0


@dataclass(frozen=True)
class Setting:
    """One step setting: implementation, precision, batch, and the perf overrides that make it."""

    impl: str = "ours"
    precision: str = "fp32"
    batch: int = 1
    channels_last: bool = False
    compiled: bool = False
    extra: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        parts = [self.impl, self.precision, f"b{self.batch}"]
        parts += ["nhwc"] if self.channels_last else []
        parts += [f"{e.split('=', 1)[0].split('.')[-1]}:{e.split('=', 1)[1]}" for e in self.extra]
        return " ".join(parts + (["compile"] if self.compiled else ["eager"]))


@dataclass
class Plan:
    """What the check runs on this device."""

    case: str
    eager: list[Setting]
    compiled: list[Setting]
    loader_workers: list[int]
    loader_source: int
    loader_crop: int
    loader_images: int
    loader_seconds: float
    warmup: int
    iters: int
    notes: list[str] = field(default_factory=list)


def cuda_plan() -> Plan:
    eager = [Setting("reference", "fp32", b) for b in (1, 4, 8)]
    eager += [Setting("ours", p, b) for p in ("fp32", "bf16") for b in (1, 4, 8)]
    eager += [Setting("ours", p, 1, extra=("perf.instance_norm_kernel=group_norm",)) for p in ("fp32", "bf16")]
    eager += [Setting("ours", "bf16", b, channels_last=True) for b in (1, 8)]
    eager += [Setting("ours", "fp16", 1)]
    # The generators' moving average: one fused lerp over their parameters per step (target: well under 2%).
    eager += [Setting("ours", "bf16", 1, extra=("train.ema_decay=0.999",))]
    # Most telling first: the time budget may cut the list short.
    compiled = [Setting("ours", "bf16", 1, compiled=True, extra=("perf.compile_mode=reduce-overhead",)),
                Setting("ours", "bf16", 1, compiled=True),
                Setting("ours", "bf16", 8, compiled=True),
                Setting("ours", "fp32", 1, compiled=True, extra=("perf.compile_mode=reduce-overhead",))]
    return Plan("res9_256", eager, compiled, [4, 8, 16], 286, 256, 256, 6.0, warmup=3, iters=10)


def cpu_plan() -> Plan:
    eager = [Setting("reference", "fp32", 1), Setting("ours", "fp32", 1), Setting("ours", "fp32", 2),
             Setting("ours", "bf16", 1), Setting("ours", "fp16", 1),
             Setting("ours", "fp32", 1, extra=("perf.instance_norm_kernel=instance_norm",)),
             Setting("ours", "fp32", 1, channels_last=True),
             Setting("ours", "fp32", 1, extra=("train.ema_decay=0.999",))]
    compiled = [Setting("ours", "fp32", 1, compiled=True, extra=("perf.compile_backend=aot_eager",))]
    notes = ["no CUDA device: a 32 px case (ngf = ndf = 4) on the CPU, loader with 1-2 workers, compile with the "
             "aot_eager backend; run on a GPU machine for the figures"]
    return Plan("smoke", eager, compiled, [1, 2], 40, 32, 16, 1.0, warmup=1, iters=3, notes=notes)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


# 1. The gpu-marked tests.

_OUTCOME = re.compile(r"(tests/test_gpu\.py::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR)|"
                      r"(PASSED|FAILED|SKIPPED|ERROR)\s+(tests/test_gpu\.py::\S+)")


def child_env() -> dict[str, str]:
    """This checkout first on the path, and whatever PYTHONPATH already holds (e.g. wheels unpacked offline)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_bounded(cmd: list[str], timeout_s: float) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr); the whole process group is killed after it (pytest's
    workers, inductor's compile workers), so nothing keeps using the GPU behind the next part's back."""
    try:
        proc = run_child(cmd, cwd=ROOT, timeout=max(timeout_s, 1), env=child_env())
    except subprocess.TimeoutExpired as exc:
        return None, exc.stdout or "", exc.stderr or ""
    return proc.returncode, proc.stdout, proc.stderr


def run_gpu_tests(timeout_s: float, cuda: bool) -> dict[str, Any]:
    """pytest -m gpu in a subprocess; each test's outcome read from its verbose line (kept if pytest is cut off)
    and its time from pytest's durations."""
    # One GPU and many cores: the tests' processes overlap (10 tests on 6 workers: the compile tests, the longest,
    # land on different workers).
    import importlib.util

    workers = ["-n", "6", "--dist", "load"] if cuda and importlib.util.find_spec("xdist") else []
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "--durations=0", "--durations-min=0",
           "-p", "no:cacheprovider", *workers, "tests/test_gpu.py"]
    t0 = time.monotonic()
    code, out, err = run_bounded(cmd, timeout_s)
    output, timed_out = out + err, code is None
    outcomes: dict[str, str] = {}
    for match in _OUTCOME.finditer(output):
        test = match.group(1) or match.group(4)
        outcomes[test.split("::", 1)[1]] = (match.group(2) or match.group(3)).lower()
    seconds: dict[str, float] = {}
    for took, test in re.findall(r"^([\d.]+)s (?:setup|call|teardown)\s+tests/test_gpu\.py::(\S+)", output, re.M):
        seconds[test] = seconds.get(test, 0.0) + float(took)
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", output, re.M)
    return {"seconds": time.monotonic() - t0, "returncode": code, "timed_out": timed_out, "outcomes": outcomes,
            "test_seconds": seconds, "failure_lines": [f"{t} {why}".strip() for t, why in failures],
            "output_tail": output[-6000:] if code != 0 else ""}


# 2. and 5. The step.

def flops_per_iteration(case: str, device: torch.device) -> float:
    """Model FLOPs of one iteration at batch 1 (convolutions; the same for every setting of a case)."""
    from torch.utils.flop_counter import FlopCounterMode

    step, crop = bench_step.make_step(case, "ours", "fp32", False, False, device)
    a, b = inputs(crop, 1, device)
    with FlopCounterMode(display=False) as counter:
        step(a, b)
    return float(counter.get_total_flops())


def inputs(crop: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple((torch.rand(batch, 3, crop, crop, generator=g) * 2 - 1).to(device) for _ in range(2))


def time_setting(case: str, s: Setting, device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    """Build the setting's step, run `warmup` iterations (compilation happens there), then time `iters`."""
    if s.compiled:
        torch._dynamo.reset()  # Each compiled setting starts from nothing: its compile time is its own.
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step, crop = bench_step.make_step(case, s.impl, s.precision, s.channels_last, s.compiled, device, s.extra)
    a, b = inputs(crop, s.batch, device)
    for _ in range(warmup):
        step(a, b)
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step(a, b)
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    extra: dict[str, Any] = {}
    ema = getattr(step, "ema", None)
    if ema is not None:
        # The average's update on its own (it is inside the timed steps too): 20 updates, the fastest.
        updates = []
        for _ in range(20):
            sync(device)
            t = time.perf_counter()
            ema.update(ema.start_step + 1)
            sync(device)
            updates.append(time.perf_counter() - t)
        extra["ema_update_s"] = min(updates)
    del step
    return {"setting": s.name, **asdict(s), "seconds": min(times), "median_s": statistics.median(times),
            "warmup_s": warm_s, "peak_mem_gib": peak, **extra}


def add_rates(row: dict[str, Any], flops_b1: float, peak_tflops: float | None) -> dict[str, Any]:
    row["images_per_s"] = 2 * row["batch"] / row["seconds"]
    row["tflops_per_s"] = flops_b1 * row["batch"] / row["seconds"] / 1e12
    row["mfu"] = row["tflops_per_s"] / peak_tflops if peak_tflops else None
    return row


def compile_in_subprocess(case: str, s: Setting, warmup: int, iters: int, timeout_s: float) -> dict[str, Any]:
    """One compiled setting in its own process: a compile that runs long is stopped, not the check."""
    spec = json.dumps({"case": case, "setting": asdict(s), "warmup": warmup, "iters": iters})
    code, out, err = run_bounded([sys.executable, __file__, "--one-setting", spec], timeout_s)
    if code is None:
        return {"setting": s.name, **asdict(s), "timed_out": True,
                "skipped": f"did not finish in the {timeout_s:.0f} s left of the time budget"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        return {"setting": s.name, **asdict(s), "error": err.strip().splitlines()[-1][-300:]
                if err.strip() else f"exit code {code}", "stderr_tail": err[-4000:]}
    return json.loads(lines[-1])


def one_setting(spec: str) -> int:
    """--one-setting: time one setting and print its row as JSON (the compile rows' subprocess)."""
    spec_d = json.loads(spec)
    setting = Setting(**{**spec_d["setting"], "extra": tuple(spec_d["setting"]["extra"])})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(time_setting(spec_d["case"], setting, device, spec_d["warmup"], spec_d["iters"])), flush=True)
    return 0


# 3. The profile.

def profile_setting(case: str, s: Setting, device: torch.device, steps: int = 5, trace: Path | None = None,
                    top: int = 10) -> dict[str, Any]:
    """Top kernels (GPU) or operators (CPU) by self time, kernels per step, host-overhead share."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step, crop = bench_step.make_step(case, s.impl, s.precision, s.channels_last, s.compiled, device, s.extra)
    a, b = inputs(crop, s.batch, device)
    for _ in range(3):
        step(a, b)
    sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(a, b)
        sync(device)
        wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    if cuda:
        kernels = [e for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA]
        # Older profilers list kernels only as device time of the operators that launched them.
        kernels = kernels or [e for e in averages if _self_device_us(e) > 0]
        times = {e.key: (e.count, _self_device_us(e)) for e in kernels}
    else:
        times = {e.key: (e.count, e.self_cpu_time_total) for e in averages}
    busy_us = sum(t for _, t in times.values())
    ranked = sorted(times.items(), key=lambda kv: -kv[1][1])[:top]
    out: dict[str, Any] = {
        "setting": s.name, "steps": steps, "wall_ms_per_step": wall / steps * 1e3,
        "top": [{"name": k[:90], "calls_per_step": c / steps, "ms_per_step": t / steps / 1e3,
                 "share": t / busy_us if busy_us else 0.0} for k, (c, t) in ranked],
    }
    if cuda:
        out["kernels_per_step"] = sum(c for c, _ in times.values()) / steps
        out["gpu_busy_ms_per_step"] = busy_us / steps / 1e3
        # Kernels of one stream do not overlap: busy time is their sum, and the rest of the wall time the GPU
        # waited for the host (launches, Python, synchronisation).
        out["host_overhead_share"] = max(0.0, 1.0 - busy_us / 1e6 / wall)
    return out


def _self_device_us(event: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


# 4. The loader.

def loader_rows(plan: Plan, demand: float | None, cuda: bool, budget: Budget, skipped: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = bench_data.make_shards(Path(tmp), plan.loader_images, plan.loader_source, "jpeg")
        for workers in plan.loader_workers:
            if budget.left() < plan.loader_seconds + 10:
                skipped.append(f"loader {workers} workers: time budget")
                continue
            rate = bench_data.throughput(shards, workers, plan.loader_crop, plan.loader_source,
                                         plan.loader_seconds, pin_memory=cuda)
            rows.append({"workers": workers, "images_per_s": rate, "per_worker": rate / workers,
                         "step_demand_images_per_s": demand, "margin": rate / demand if demand else None})
    return rows


# The table.

def checkpoint_row(case: str, device: torch.device, saves: int = 3) -> dict[str, Any]:
    """The sharded checkpoint of a real training state at batch 1 (networks, Adam, EMA, full pools): how long the
    loop is blocked per save (the staging copy, from CUDA into pinned host memory) and when the write is durable."""
    from pipeline.config import load_config
    from pipeline.engine.checkpoint import Checkpointer
    from pipeline.engine.dist import DistInfo
    from pipeline.train.build import build_components
    from pipeline.train.state import TrainingState

    overrides, crop = bench_step.CASES[case]
    cfg = load_config([], [*overrides, f"train.device={device.type}", "train.ema_decay=0.999"])
    parts = build_components(cfg, DistInfo(), device)
    state = TrainingState(parts.nets, parts.step.optimisers, parts.step.pools, device, parts.ema)
    for step in range(cfg.train.pool_size + 1):  # Full pools: a checkpoint of real size.
        parts.step(*inputs(crop, 1, device))
        parts.ema.update(step + cfg.train.ema_start_step + 1)
    sync(device)
    blocked, durable, written = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        writer = Checkpointer(Path(tmp), keep_last=1)
        for step in range(1, saves + 1):
            sync(device)
            t0 = time.perf_counter()
            writer.save(step, state.header(cfg, None, 1), state.shared_state(), state.rank_state())
            blocked.append(time.perf_counter() - t0)
            [outcome] = writer.wait()
            if outcome.error:
                raise RuntimeError(outcome.error)
            durable.append(outcome.durable_s)
            written = outcome.bytes_written
        writer.close()
    return {"setting": f"checkpoint {case} b1", "blocked_ms": 1000 * statistics.median(blocked),
            "durable_s": statistics.median(durable), "bytes": written}


def fmt_step(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    parts = [f"{row['seconds'] * 1e3:.1f} ms/step", f"{row['images_per_s']:.1f} img/s"]
    if row.get("mfu") is not None:
        parts.append(f"MFU {row['mfu']:.1%}")
    if row.get("peak_mem_gib") is not None:
        parts.append(f"{row['peak_mem_gib']:.2f} GiB")
    if row.get("vs_reference"):
        parts.append(f"{row['vs_reference']:.2f}x reference")
    if "ema_overhead" in row:
        parts.append(f"EMA update {row['ema_update_s'] * 1e3:.2f} ms = {row['ema_overhead']:.2%} of a step")
    if row.get("compiled"):
        parts.append(f"warm-up incl. compile {row['warmup_s']:.0f} s")
    return ", ".join(parts)


def table(report: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str, str, str]] = []

    def add(part: str, item: str, result: str, figures: str = "") -> None:
        rows.append((part, item, result, figures))

    tests = report["tests"]
    for name, outcome in sorted(tests.get("outcomes", {}).items()):
        took = tests.get("test_seconds", {}).get(name)
        add("tests", name, outcome, "no CUDA" if outcome == "skipped" else f"{took:.1f} s" if took else "")
    if tests.get("timed_out"):
        add("tests", "(pytest)", "timeout", f"stopped after {tests['seconds']:.0f} s")
    for row in report["step"] + report["compile"]:
        result = "error" if "error" in row else "skipped" if "skipped" in row else "ok"
        add("step" if not row.get("compiled") else "compile", row["setting"], result, fmt_step(row))
    prof = report.get("profile") or {}
    if "error" in prof:
        add("profile", prof.get("setting", ""), "error", prof["error"])
    elif prof:
        summary = f"{prof['wall_ms_per_step']:.1f} ms/step wall"
        if "host_overhead_share" in prof:
            summary += (f", GPU busy {prof['gpu_busy_ms_per_step']:.1f} ms, host overhead "
                        f"{prof['host_overhead_share']:.0%}, {prof['kernels_per_step']:.0f} kernels/step")
        add("profile", prof["setting"], "ok", summary)
        for entry in prof["top"][:5]:
            add("profile", f"  {entry['name']}", "", f"{entry['ms_per_step']:.2f} ms/step ({entry['share']:.0%}), "
                f"{entry['calls_per_step']:.0f} calls/step")
    for row in report.get("checkpoint", []):
        if "error" in row:
            add("ckpt", row["setting"], "error", row["error"])
        else:
            add("ckpt", row["setting"], "ok", f"training blocked {row['blocked_ms']:.1f} ms per save, durable after "
                f"{row['durable_s']:.2f} s, {row['bytes'] / 2**20:.0f} MiB")
    for row in report["loader"]:
        margin = f", {row['margin']:.1f}x the step's demand" if row.get("margin") else ""
        add("loader", f"jpeg {row['workers']} workers", "ok", f"{row['images_per_s']:.0f} img/s{margin}")
    for what in report["skipped"]:
        add("skipped", what, "", "")
    width = min(72, max(len(item) for _, item, _, _ in rows) + 2)
    lines = [f"{'part':<8}{'item':<{width}}{'result':<9}figures"]
    lines += [f"{part:<8}{item:<{width}}{result:<9}{figures}".rstrip() for part, item, result, figures in rows]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=460.0, help="wall-clock budget of the whole check")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--trace", type=Path, default=None, help="also write the profiled steps' Chrome trace")
    parser.add_argument("--skip-tests", action="store_true", help="only the measurements")
    parser.add_argument("--one-setting", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_setting:
        return one_setting(args.one_setting)

    budget = Budget(args.budget_s)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    plan = cuda_plan() if cuda else cpu_plan()
    skipped: list[str] = [] if cuda else ["CUDA graphs (perf.compile_mode=reduce-overhead): needs CUDA",
                                          "inductor code generation for CUDA: needs CUDA"]
    report: dict[str, Any] = {
        "device": device_name(device), "cuda": torch.version.cuda, "torch": torch.__version__,
        "case": plan.case, "budget_s": args.budget_s, "notes": plan.notes, "skipped": skipped,
        "tests": {}, "step": [], "profile": None, "loader": [], "compile": [], "checkpoint": [],
    }
    print(f"GPU check on {report['device']} (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}), budget "
          f"{args.budget_s:.0f} s", flush=True)

    # 1. Tests, within what the measurements leave them: the eager rows, profile and loader take about two
    # minutes on an H100/H200, and the first compiled setting gets COMPILE_RESERVE_S.
    if args.skip_tests:
        skipped.append("gpu tests: --skip-tests")
    else:
        report["tests"] = run_gpu_tests(budget.left() - MEASURE_S - COMPILE_RESERVE_S if cuda else budget.left(),
                                        cuda)
        if not cuda:
            skipped.append(f"gpu tests ({len(report['tests']['outcomes'])}): collected and skipped, no CUDA")
        print(f"tests: {report['tests']['seconds']:.0f} s, {sorted(set(report['tests']['outcomes'].values()))}",
              flush=True)
    if cuda:
        torch.backends.cudnn.benchmark = True

    # 2. Eager step rows.
    peak = bench_step.peak_tflops(device)
    try:
        flops_b1 = flops_per_iteration(plan.case, device)
    except Exception as err:  # A broken step still leaves the rest of the check to report.
        flops_b1 = 0.0
        report["step"].append({"setting": "flop count", "error": repr(err)})
    reference: dict[int, float] = {}
    # Kept back for the profile, the loader and at least one compiled setting.
    reserve = PROFILE_LOADER_S + COMPILE_RESERVE_S if cuda else 5
    for s in plan.eager:
        if budget.left() < reserve:
            skipped.append(f"step {s.name}: time budget")
            continue
        try:
            row = add_rates(time_setting(plan.case, s, device, plan.warmup, plan.iters), flops_b1, peak)
        except Exception as err:
            row = {"setting": s.name, **asdict(s), "error": repr(err)[:300], "traceback": traceback.format_exc()}
        if s.impl == "reference" and "error" not in row:
            reference[s.batch] = row["seconds"]
        elif "error" not in row and s.batch in reference:
            row["vs_reference"] = reference[s.batch] / row["seconds"]
        plain = next((r for r in report["step"] if r.get("impl") == s.impl and r.get("precision") == s.precision
                      and r.get("batch") == s.batch and not r.get("extra") and not r.get("channels_last")
                      and "seconds" in r), None)
        if "ema_update_s" in row and plain:
            row["ema_overhead"] = row["ema_update_s"] / plain["seconds"]  # One update against one plain step.
        report["step"].append(row)
        print(f"step {row['setting']}: {fmt_step(row)}", flush=True)

    # 3. Profile of the fastest eager batch-1 setting of ours.
    ours_b1 = [r for r in report["step"] if r.get("impl") == "ours" and r.get("batch") == 1 and "error" not in r]
    if ours_b1:
        fastest = min(ours_b1, key=lambda r: r["seconds"])
        s = Setting(**{k: fastest[k] for k in ("impl", "precision", "batch", "channels_last", "compiled")},
                    extra=tuple(fastest["extra"]))
        try:
            report["profile"] = profile_setting(plan.case, s, device, trace=args.trace)
        except Exception as err:
            report["profile"] = {"setting": s.name, "error": repr(err)[:300], "traceback": traceback.format_exc()}
    fastest_rate = max((r["images_per_s"] for r in report["step"] if "images_per_s" in r), default=None)

    # 3b. A checkpoint of the real state: the staging copy is all the loop waits for.
    try:
        report["checkpoint"].append(checkpoint_row(plan.case, device))
    except Exception as err:
        report["checkpoint"].append({"setting": f"checkpoint {plan.case} b1", "error": repr(err)[:300],
                                     "traceback": traceback.format_exc()})
    print(f"checkpoint: {report['checkpoint'][-1]}", flush=True)

    # 4. Loader against the fastest step's demand.
    try:
        report["loader"] = loader_rows(plan, fastest_rate, cuda, budget, skipped)
    except Exception as err:
        report["loader"] = []
        skipped.append(f"loader: error {err!r}"[:300])

    # 5. Compiled settings, each in its own process with what is left of the budget.
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    for s in plan.compiled:
        left = budget.left() - 5
        if not compiler and s.extra != ("perf.compile_backend=aot_eager",):
            skipped.append(f"compile {s.name}: no C compiler (inductor builds its launchers with one)")
            continue
        if left < (60 if cuda else 5):
            skipped.append(f"compile {s.name}: time budget")
            continue
        row = compile_in_subprocess(plan.case, s, plan.warmup + 2, plan.iters, left)
        if row.get("timed_out"):
            skipped.append(f"compile {s.name}: time budget (stopped after {left:.0f} s)")
        if "error" not in row and "skipped" not in row:
            row = add_rates(row, flops_b1, peak)
            eager = next((r for r in report["step"] if r.get("impl") == "ours" and r.get("precision") == s.precision
                          and r.get("batch") == s.batch and not r.get("extra") and not r.get("channels_last")
                          and "seconds" in r), None)
            if eager:
                row["vs_eager"] = eager["seconds"] / row["seconds"]
            if s.batch in reference:
                row["vs_reference"] = reference[s.batch] / row["seconds"]
        report["compile"].append(row)
        print(f"compile {row['setting']}: {fmt_step(row)}", flush=True)

    report["seconds"] = args.budget_s - budget.left()
    lines = table(report)
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.json} ({report['seconds']:.0f} s)")
    failed = [t for t, o in report["tests"].get("outcomes", {}).items() if o in ("failed", "error")]
    errors = [r["setting"] for r in report["step"] + report["compile"] + report["checkpoint"] if "error" in r]
    tests_bad = not args.skip_tests and report["tests"].get("returncode") != 0  # Also: not run, cut off.
    if tests_bad:
        print(f"FAILED gpu tests (pytest exit {report['tests'].get('returncode')}): "
              f"{', '.join(failed) or 'see tests.output_tail in the JSON'}")
    if errors:
        print(f"FAILED settings: {', '.join(errors)}")
    return 1 if tests_bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
