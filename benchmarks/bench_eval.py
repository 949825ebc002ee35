"""Evaluation split at the source: per-rank images decoded, peak memory and seconds per evaluation at W = 1, 2, 4.

    python benchmarks/bench_eval.py [--images 2000] [--size 32] [--ranks 1,2,4] [--json benchmarks/results/eval.json]
                                    [--smoke]

Generates IMAGES held-out pairs (the synthetic set, SIZE px, paired keys) and a small scripted feature extractor,
then for each world size W one torchrun of W gloo ranks on this CPU (benchmarks/eval_probe.py) evaluates one
direction as training does: each rank decodes and translates its share, FID comes from all-reduced moments and KID
from features gathered to rank 0. Per rank: files decoded (sources, real targets and ground truth), images
translated, seconds, peak resident memory. On 2 cores, more than 2 ranks share them, so seconds at W = 4 show the
work per rank, not a speed-up; decodes are the figure that scales.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import run_child, write_json
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import dataset_scripts  # noqa: E402


class Thumbnail(nn.Module):
    """A feature extractor of a few numbers per image: FID and KID run as with Inception, at a fraction of the cost."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(images, 4).flatten(1), images.std(dim=(2, 3))], dim=1)


def run(world: int, root: Path, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(ROOT / "benchmarks" / "eval_probe.py"), str(out), str(root / "testA"), str(root / "testB"),
           str(root / "thumbnail.pt")]
    proc = run_child(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "eval.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny case for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.ranks = 24, 24, "1,2"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset_scripts.load("synthetic").make_synthetic(root, train=0, test=args.images, size=args.size, seed=5)
        torch.jit.save(torch.jit.script(Thumbnail()), root / "thumbnail.pt")
        for world in map(int, args.ranks.split(",")):
            ranks = run(world, root, root / f"w{world}")
            rows.extend(ranks)
            most = max(ranks, key=lambda r: r["decoded"])
            print(f"W={world}: {most['decoded']:5d} files decoded by the busiest rank (of {2 * args.images}), "
                  f"{max(r['seconds'] for r in ranks):6.2f} s, peak RSS {max(r['peak_rss_mb'] for r in ranks):6.0f} "
                  f"MB per rank, FID {ranks[0]['fid']:.6f}", flush=True)
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
