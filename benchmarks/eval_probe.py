"""One rank of bench_eval.py: evaluate one direction on its share of a held-out set and write what it cost.

Usage: torchrun --standalone --nproc_per_node=W benchmarks/eval_probe.py OUT_DIR SOURCE TARGET FEATURES
Writes OUT_DIR/rank-R.json: images in the set, files decoded and images translated by this rank, seconds of the
evaluation, peak resident memory and its rise during the evaluation.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pipeline.engine import dist  # noqa: E402
from pipeline.eval.evaluate import Share  # noqa: E402
from tests.support.sharded_eval import evaluate  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def main(argv: list[str]) -> int:
    out, source, target, features = argv
    info = dist.read_env()
    dist.init_process_group(info, torch.device("cpu"))
    torch.set_num_threads(1)
    before = rss_mb()
    dist.barrier()
    t0 = time.perf_counter()
    result, translated, decoded = evaluate(source, target, features, Share.of_process_group())
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    Path(out, f"rank-{info.rank}.json").write_text(json.dumps({
        "world_size": info.world_size, "rank": info.rank, "images": int(result["images"]), "decoded": decoded,
        "translated": translated, "seconds": seconds, "peak_rss_mb": peak, "rss_rise_mb": peak - before,
        "fid": result.get("fid")}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
