"""One rank of bench_checkpoint.py: saves and resumes a training-sized state with the landed design and the new one.

    torchrun --nproc_per_node=W benchmarks/checkpoint_probe.py OUT.json DIR --size 256 --shared-mb 48 --saves 3

The per-rank state is real: two ImagePools of 50 fakes at SIZE px (float32) and this rank's random states. The
replicated state stands for the networks, optimisers and EMA: SHARED_MB of float32 tensors in 200 entries (the
real resnet_9blocks ngf=ndf=64 state is 430 MB; a smaller one keeps 8 ranks within this machine's memory, and it
enters both designs the same way).

- landed: every rank's pools and random states go to rank 0 with gather_object; rank 0 writes one torch.save
  file (fsynced) while the others wait in a broadcast; on resume every rank loads the whole file.
- sharded: pipeline.engine.checkpoint.Checkpointer (DCP, each rank writes its own entries and a share of the
  replicated ones, in a background thread); on resume each rank reads the replicated state and its own entry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from pipeline.engine import dist
from pipeline.engine.checkpoint import Checkpointer, checkpoint_path, load_checkpoint, save_atomic
from pipeline.gan.image_pool import ImagePool


def rss_now() -> int:
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Resets VmHWM to the current RSS (Linux).


def peak() -> int:
    return _status("VmHWM")


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def make_state(rank: int, size: int, shared_mb: float) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(0)  # The same on every rank: replicated.
    per = int(shared_mb * 2**20 / 4 / 200)
    shared = {"nets": {f"w{i}": torch.randn(per, generator=gen) for i in range(200)}}
    pools = []
    for domain in range(2):
        pool = ImagePool(50, seed=rank * 10 + domain)
        pool.query(torch.randn(50, 3, size, size))
        pools.append(pool)
    own = {"pool_a": pools[0].state_dict(), "pool_b": pools[1].state_dict(),
           "rng": {"torch": torch.get_rng_state()}}
    return shared, own


def header(step: int, world: int) -> dict:
    return {"format": "cyclegan-pipeline/2", "step": step, "world_size": world, "model": {}, "config": "",
            "images_seen": step, "nonfinite_steps": 0, "mlflow_run_id": "", "code_version": "bench"}


def landed_save(directory: Path, step: int, shared: dict, own: dict, world: int) -> dict:
    t0 = time.perf_counter()
    ranks = dist.gather_to_main(own)
    written = 0
    if ranks is not None:
        path = directory / f"ckpt-{step:09d}.pt"
        state = {**header(step, world), "format": "cyclegan-pipeline/1", **shared, "ranks": ranks}
        written = save_atomic(state, path)
        del state, ranks
    dist.broadcast_from_main(None)
    blocked = time.perf_counter() - t0
    return {"blocked_s": blocked, "durable_s": blocked, "bytes_written": written}


def sharded_save(writer: Checkpointer, step: int, shared: dict, own: dict, world: int) -> dict:
    t0 = time.perf_counter()
    writer.save(step, header(step, world), shared, own)
    blocked = time.perf_counter() - t0
    [outcome] = writer.wait()
    if outcome.error:
        raise SystemExit(outcome.error)
    return {"blocked_s": blocked, "durable_s": outcome.durable_s, "bytes_written": outcome.bytes_written}


def measure(design: str, directory: Path, saves: int, shared: dict, own: dict, world: int, rank: int) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    writer = Checkpointer(directory, keep_last=1, is_main=rank == 0) if design == "sharded" else None
    rows = []
    for step in range(1, saves + 1):
        dist.barrier()
        before = rss_now()
        reset_peak()
        row = (sharded_save(writer, step, shared, own, world) if writer else
               landed_save(directory, step, shared, own, world, ))
        row.update(peak_rss=peak(), peak_rss_increase=peak() - before)
        rows.append(row)
        if design == "landed" and rank == 0 and step > 1:
            (directory / f"ckpt-{step - 1:09d}.pt").unlink()
    if writer:
        writer.close()
    dist.barrier()
    path = checkpoint_path(directory, saves) if design == "sharded" else directory / f"ckpt-{saves:09d}.pt"
    os.sync()
    read0 = bytes_read()
    t0 = time.perf_counter()
    state = load_checkpoint(path, ranks=rank if design == "sharded" else "all")
    resume_s = time.perf_counter() - t0
    read = bytes_read() - read0
    assert torch.equal(state["ranks"][rank]["pool_a"]["images"], own["pool_a"]["images"])
    del state
    dist.barrier()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    return {"blocked_s": med("blocked_s"), "durable_s": med("durable_s"), "bytes_written": med("bytes_written"),
            "peak_rss": med("peak_rss"), "peak_rss_increase": med("peak_rss_increase"), "resume_bytes_read": read,
            "resume_s": resume_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shared-mb", type=float, default=48.0)
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    info = dist.read_env()
    dist.init_process_group(info, torch.device("cpu"), 600.0, single_rank=True)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    shared, own = make_state(rank, args.size, args.shared_mb)
    result = {}
    for design in ("landed", "sharded"):
        result[design] = measure(design, args.dir / design, args.saves, shared, own, world, rank)
    everyone = dist.gather_objects(result)
    if rank == 0:
        args.out.write_text(json.dumps(everyone))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
