"""Start-up and failure paths that do not grow with the world size: shard patterns expanded once per job, lost
peers named by probing each host once, all at the same time.

A host that drops packets cannot be made here without network namespaces (this sandbox even answers for
unrouted addresses), so the silent host's probe is simulated; the others are real sockets. The whole path, a
host cut off for real, is tests/test_hosts.py's lost-host test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from support.runs import ROOT, free_port, process_env

from pipeline.engine import dist

# Two gloo ranks in two processes, each in its own working directory: only rank 0's holds the shards, so rank 1
# gets the lists only if it never expands the (relative) patterns itself.
EXPAND_ON_TWO_RANKS = """
import json, os, sys
import torch.distributed as td
from pipeline.config import load_config
from pipeline.engine.dist import DistInfo
from pipeline.train.loop import _inputs_from_main
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
cfg = load_config([], ["data.train_a=shards/trainA/*.tar", "data.train_b=shards/trainB/*.tar"])
urls = _inputs_from_main(cfg, DistInfo(rank=rank, world_size=2, local_rank=rank))
open(out, "w").write(json.dumps({"urls": urls, "cwd_has_shards": os.path.isdir("shards")}))
td.destroy_process_group()
"""


def test_rank_0_expands_the_shard_patterns_for_the_job(shards, tmp_path):
    home = {0: tmp_path / "rank0", 1: tmp_path / "rank1"}
    for folder in home.values():
        folder.mkdir()
    source = Path(shards["trainA"]).parent.parent
    shutil.copytree(source, home[0] / "shards")  # Rank 1's folder has none: its own glob would fail.
    port = str(free_port())
    env = process_env(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", EXPAND_ON_TWO_RANKS, str(rank), port,
                               str(tmp_path / f"{rank}.json")],
                              cwd=home[rank], env=env, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert got[0]["urls"] == got[1]["urls"] and not got[1]["cwd_has_shards"]
    assert got[0]["urls"]["A"] == sorted(f"shards/trainA/{p.name}" for p in (source / "trainA").glob("*.tar"))


def test_each_host_is_probed_once_and_at_once_and_every_rank_of_a_silent_host_is_named(monkeypatch):
    silent = "192.0.2.7"  # TEST-NET-1: its probe is the simulated one.
    layout = [("h1", "127.0.0.1")] * 8 + [("h2", silent)] * 8 + [("h3", "127.0.0.2")] * 8  # 127.0.0.2 refuses.
    monkeypatch.setattr(dist, "_HOSTS", layout)
    calls, spans, lock = [], [], threading.Lock()

    def probe(address: str, timeout_s: float) -> bool:
        start = time.monotonic()
        time.sleep(0.3)  # Long enough for the probes to overlap if they run together.
        answered = False if address == silent else dist._answers(address, timeout_s)
        with lock:
            calls.append(address)
            spans.append((start, time.monotonic()))
        return answered

    named = dist.unreachable_peers(0, timeout_s=1.0, answers=probe)
    assert sorted(calls) == sorted([silent, "127.0.0.2"])  # Not rank 0's own host, each other host once.
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # Concurrent, not one after another.
    assert named == ", ".join(f"rank {r} on host h2 ({silent})" for r in range(8, 16))


def test_no_silent_peer_is_none(monkeypatch):
    monkeypatch.setattr(dist, "_HOSTS", [("h1", "127.0.0.1"), ("h3", "127.0.0.2")])
    assert dist.unreachable_peers(0, timeout_s=1.0) is None
