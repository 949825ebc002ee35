"""Checkpoint cost against the number of ranks: the landed design (gather to rank 0, one file) and the sharded one.

    python benchmarks/bench_checkpoint.py [--ranks 1,2,4,8] [--size 256] [--shared-mb 48] [--saves 3]
                                          [--json benchmarks/results/checkpoint.json] [--smoke]

For each world size W, one torchrun of W gloo ranks on this CPU (benchmarks/checkpoint_probe.py) saves a state of
real per-rank size (two pools of 50 fakes at SIZE px, float32: 78.6 MB at 256 px) and a replicated state of
SHARED_MB (small networks: the real resnet_9blocks state with Adam and EMA is 430 MB), first with the landed design,
then with the sharded one, and resumes from each. Per W and design it reports: bytes each rank writes, rank 0's
peak resident memory during a save (and its rise over the memory before it), seconds the loop is blocked per save,
seconds until the checkpoint is durable, and bytes each rank reads on resume (medians over SAVES saves). Then the
same quantities on paper for 8, 64 and 512 ranks at 256 and 1024 px with the real state sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _report import run_child, write_json

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
REAL_SHARED = 430e6  # resnet_9blocks ngf=ndf=64: four nets, two Adams, EMA of both generators (float32).


def pool_bytes(size: int) -> float:
    return 2 * 50 * 3 * size * size * 4


def measured(world: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(ROOT / "benchmarks" / "checkpoint_probe.py"), str(out), str(Path(tmp) / "ckpt"),
               "--size", str(args.size), "--shared-mb", str(args.shared_mb), "--saves", str(args.saves)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = run_child(cmd, env=env, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-4000:])
        return json.loads(out.read_text())


def summarise(world: int, ranks: list[dict], design: str) -> dict:
    rows = [r[design] for r in ranks]
    return {
        "design": design, "world_size": world,
        "bytes_written_max_rank": max(r["bytes_written"] for r in rows),
        "bytes_written_rank0": rows[0]["bytes_written"],
        "rank0_peak_rss": rows[0]["peak_rss"], "rank0_peak_rss_increase": rows[0]["peak_rss_increase"],
        "blocked_s": max(r["blocked_s"] for r in rows), "durable_s": max(r["durable_s"] for r in rows),
        "resume_bytes_read_max_rank": max(r["resume_bytes_read"] for r in rows),
    }


def on_paper(world: int, size: int, disk_gbps: float = 1.0, pcie_gbps: float = 25.0) -> dict:
    """The same quantities for the real state sizes (R = 430 MB replicated, P per rank), from the designs' rules."""
    p, r = pool_bytes(size), REAL_SHARED
    file = r + world * p
    return {
        "world_size": world, "size": size,
        "landed": {"file": file, "rank0_writes": file, "rank0_gpu_extra_gather": world * p,
                   "read_per_rank": file, "read_total": world * file, "blocked_s": file / (disk_gbps * 1e9)},
        "sharded": {"max_rank_writes": p + r / world, "rank0_gpu_extra_gather": 0.0, "read_per_rank": r + p,
                    "read_total": world * (r + p), "blocked_s": (r + p) / (pcie_gbps * 1e9),
                    "durable_s": (p + r / world) / (disk_gbps * 1e9)},
    }


def spread(values: list[float]) -> float:
    """Largest relative distance from the W=1 value."""
    return max(abs(v - values[0]) / values[0] for v in values) if values[0] else 0.0


def growth(values: list[float]) -> float:
    """Largest relative rise over the W=1 value (0 when no W needs more than W=1)."""
    return max(0.0, max(v / values[0] - 1 for v in values)) if values[0] else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shared-mb", type=float, default=48.0)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="folder for the checkpoints (default: the system's temp)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/checkpoint.json"))
    parser.add_argument("--smoke", action="store_true", help="2 ranks at 32 px, 1 MB replicated: a quick check")
    args = parser.parse_args(argv)
    if args.smoke:
        args.ranks, args.size, args.shared_mb, args.saves = "1,2", 32, 1.0, 1
    worlds = [int(w) for w in args.ranks.split(",")]
    rows = []
    print(f"{'design':>8}{'W':>4}{'MB written/rank':>17}{'rank0 peak MB':>15}{'(rise)':>9}{'blocked s':>11}"
          f"{'durable s':>11}{'MB read/rank':>14}")
    for world in worlds:
        ranks = measured(world, args)
        for design in ("landed", "sharded"):
            row = summarise(world, ranks, design)
            rows.append(row)
            print(f"{design:>8}{world:>4}{row['bytes_written_max_rank'] / MB:>17.1f}{row['rank0_peak_rss'] / MB:>15.0f}"
                  f"{row['rank0_peak_rss_increase'] / MB:>9.0f}{row['blocked_s']:>11.3f}{row['durable_s']:>11.3f}"
                  f"{row['resume_bytes_read_max_rank'] / MB:>14.1f}", flush=True)

    new = [r for r in rows if r["design"] == "sharded"]
    old = [r for r in rows if r["design"] == "landed"]
    checks = {
        "sharded_rank0_peak_spread": spread([r["rank0_peak_rss"] for r in new]),
        "sharded_written_growth": growth([r["bytes_written_max_rank"] for r in new]),
        "sharded_read_spread": spread([r["resume_bytes_read_max_rank"] for r in new]),
        "sharded_blocked_over_landed_write_w1": new[0]["blocked_s"] / old[0]["blocked_s"],
    }
    print(f"\nsharded, W=1..{worlds[-1]}: rank 0 peak memory within {100 * checks['sharded_rank0_peak_spread']:.1f}%, "
          f"bytes written by any rank at most {100 * checks['sharded_written_growth']:.1f}% above W=1 (its share of "
          f"the replicated state falls as 1/W), bytes read per rank within "
          f"{100 * checks['sharded_read_spread']:.1f}% of W=1; blocked per save "
          f"{checks['sharded_blocked_over_landed_write_w1']:.3f}x the landed synchronous write at W=1")

    paper = [on_paper(w, s) for s in (256, 1024) for w in (8, 64, 512)]
    print("\non paper, real state sizes (R = 430 MB replicated; disk 1 GB/s per writer, host copy 25 GB/s):")
    print(f"{'px':>5}{'W':>5}{'landed file GB':>16}{'rank0 GPU extra GB':>20}{'read total GB':>15}{'blocked s':>11}"
          f" |{'sharded max write GB':>21}{'read/rank GB':>14}{'read total GB':>15}{'blocked s':>11}")
    for p in paper:
        lo, sh = p["landed"], p["sharded"]
        print(f"{p['size']:>5}{p['world_size']:>5}{lo['file'] / 1e9:>16.2f}{lo['rank0_gpu_extra_gather'] / 1e9:>20.1f}"
              f"{lo['read_total'] / 1e9:>15.0f}{lo['blocked_s']:>11.1f} |{sh['max_rank_writes'] / 1e9:>21.3f}"
              f"{sh['read_per_rank'] / 1e9:>14.2f}{sh['read_total'] / 1e9:>15.0f}{sh['blocked_s']:>11.3f}")
    write_json(args.json, {"size": args.size, "shared_mb": args.shared_mb, "saves": args.saves, "rows": rows,
                           "checks": checks, "on_paper": paper,
                           "note": "gloo ranks on one CPU host; small replicated state, real per-rank pool sizes"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
