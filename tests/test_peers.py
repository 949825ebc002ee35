"""Naming lost peers after a failed collective: each host probed once, all at the same time.

A host that drops packets cannot be made here without network namespaces (this sandbox even answers for
unrouted addresses), so the silent host's probe is simulated; the others are real sockets. The whole path, a
host cut off for real, is tests/test_hosts.py's lost-host test."""

from __future__ import annotations

import threading
import time

from pipeline.engine import dist


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
