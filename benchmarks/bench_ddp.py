"""DDP overhead: 1 vs N processes (gloo on CPU, torchrun) at equal per-rank batch, and peak host memory.

    python benchmarks/bench_ddp.py [--nprocs 1,2] [--steps 10] [--crop 64] [--json out.json] [--smoke]

Each process gets one thread (OMP_NUM_THREADS=1), so on a machine with at least N free cores the per-step time
ratio isolates the gradient all-reduce and the per-step agreement collective. Scaling efficiency is
(images/s with N) / (N x images/s with 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _report import run_child

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["model.generator=resnet_6blocks", "model.ngf=16", "model.ndf=16", "train.pool_size=50"]


def run(nproc: int, steps: int, crop: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "benchmarks" / "ddp_probe.py"), str(out), str(steps), str(crop), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = run_child(cmd, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ddp.json"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    overrides = MODEL
    if args.smoke:
        args.steps, args.crop = 2, 32
        overrides = ["model.generator=resnet_6blocks", "model.ngf=4", "model.ndf=4"]
    rows, base = [], None
    print(f"{'procs':>6}{'ms/step':>10}{'img/s':>9}{'scaling':>9}{'peak RSS/rank GB':>18}")
    for nproc in (int(n) for n in args.nprocs.split(",")):
        result = run(nproc, args.steps, args.crop, overrides)
        rate = 2 * nproc / result["seconds_per_step"]
        base = base or rate / nproc
        row = {**result, "images_per_s": rate, "scaling_efficiency": rate / (nproc * base)}
        rows.append(row)
        print(f"{nproc:>6}{result['seconds_per_step'] * 1e3:>10.1f}{rate:>9.1f}{row['scaling_efficiency']:>9.2f}"
              f"{max(result['peak_rss_gb_per_rank']):>18.2f}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"crop": args.crop, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
