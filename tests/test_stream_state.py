"""Stream state instead of replay: a loader resumed from its saved state continues bit for bit, and what it reads
to get there does not grow with how far the run had gone (local shards and a real HTTP server)."""

from __future__ import annotations

import glob
import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
from support import loaders
from support.http_server import Server

from pipeline.data.shard_reader import READ
from pipeline.data.stream import train_loader
from pipeline.data.stream_state import stream_identity, stream_start
from pipeline.engine.checkpoint.codec import flatten, unflatten


def data_cfg(shards, **extra):
    """No workers (every byte read is counted in this process) and a buffer of 8, unless `extra` says otherwise."""
    return loaders.data_cfg(shards, **{"workers": 0, "shuffle_buffer": 8, **extra})


def through_a_checkpoint(state):
    """The state as a checkpoint stores and gives it back (JSON skeleton and tensors)."""
    skeleton, tensors = flatten(state, "stream")
    return unflatten(json.loads(json.dumps(skeleton)), tensors)


def batches(loader, n):
    return [(a.clone(), b.clone()) for a, b in itertools.islice(iter(loader), n)]


def stopped_at(cfg, step):
    """A loader's state after `step` batches (what a checkpoint at that step holds)."""
    loader = train_loader(cfg, seed=5, rank=1)
    iterator = iter(loader)
    for _ in range(step):
        next(iterator)
    return through_a_checkpoint(loader.state_dict())


@pytest.fixture(params=["local", "http"])
def source(request, shards):
    """(shard patterns, the HTTP server or None, the largest shard's size): the training shards as local files or
    from a real HTTP server."""
    files = [Path(p) for split in ("trainA", "trainB") for p in sorted(glob.glob(shards[split]))]
    largest = max(f.stat().st_size for f in files)
    if request.param == "local":
        yield shards, None, largest
        return
    server = Server(files[0].parent.parent)
    urls = {split: "::".join(f"{server.url}/{split}/{Path(p).name}" for p in sorted(glob.glob(shards[split])))
            for split in ("trainA", "trainB")}
    yield urls, server, largest
    server.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_from_its_state_continues_bit_for_bit(source, workers):
    shards, _, _ = source
    cfg = data_cfg(shards, workers=workers)
    straight = batches(train_loader(cfg, seed=5, rank=1), 30)
    for step in (3, 23):  # In the first pass, and after several (48 samples a domain, 2 a batch).
        resumed = batches(train_loader(cfg, seed=5, rank=1, state=stopped_at(cfg, step)), 30 - step)
        assert len(resumed) == 30 - step
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(straight[step:], resumed))


def resume_cost(cfg, start, server):
    """Bytes read (local: by this process; http: sent by the server) until the resumed loader's first batch."""
    READ.clear()
    sent = server.sent if server else 0
    batches(train_loader(cfg, seed=5, rank=1, **start), 1)
    return server.sent - sent if server else READ["bytes"]


def test_resume_reads_do_not_grow_with_the_step(source):
    shards, server, shard_bytes = source
    cfg = data_cfg(shards)
    step = 5
    at_s = resume_cost(cfg, {"state": stopped_at(cfg, step)}, server)
    at_4s = resume_cost(cfg, {"state": stopped_at(cfg, 4 * step)}, server)
    assert 0 < at_4s <= at_s + 2 * shard_bytes  # Within one shard per stream (A and B).
    # Replaying (a checkpoint without stream state) reads what the run consumed: it grows with the step.
    replay_s = resume_cost(cfg, {"start_batch": step}, server)
    replay_4s = resume_cost(cfg, {"start_batch": 4 * step}, server)
    assert replay_4s > replay_s + 2 * shard_bytes and replay_4s > 2 * at_4s


def test_a_changed_world_size_or_worker_count_starts_new_streams_with_a_warning(shards, caplog):
    urls = {"A": sorted(glob.glob(shards["trainA"])), "B": sorted(glob.glob(shards["trainB"]))}
    cfg = data_cfg(shards)
    saved_by = {"identity": stream_identity(cfg, urls, 2), "loader": stopped_at(cfg, 4)}
    checkpoint = {"step": 4, "world_size": 2, "ranks": [None, {"stream": saved_by}]}
    assert stream_start(checkpoint, 1, stream_identity(cfg, urls, 2)).state is not None
    with caplog.at_level(logging.WARNING):
        start = stream_start(checkpoint, 1, stream_identity(data_cfg(shards, workers=2), urls, 2))
        assert start.state is None and start.fresh_from == 4
        start = stream_start({**checkpoint, "ranks": [{"stream": saved_by}]}, 0, stream_identity(cfg, urls, 1))
        assert start.state is None and start.fresh_from == 4
        fewer = {"A": urls["A"][1:], "B": urls["B"]}  # A shard deleted (or added): positions name other shards.
        assert stream_start(checkpoint, 1, stream_identity(cfg, fewer, 2)).fresh_from == 4
    said = [r.getMessage() for r in caplog.records]
    assert "data.workers 0 -> 2" in said[0] and "the world size 2 -> 1" in said[1]
    assert "the shard lists changed (3+3 -> 2+3 shards for A+B)" in said[2]
    assert "starts new streams at step 4" in said[1]
    # New streams are seeded apart from the run's first ones: they do not repeat its first batches.
    fresh = batches(train_loader(cfg, seed=5, rank=1, fresh_from=4), 2)
    first = batches(train_loader(cfg, seed=5, rank=1), 2)
    assert not torch.equal(fresh[0][0], first[0][0])



def test_pipe_shards_resume_bit_for_bit_reading_again_only_the_shards_the_buffer_refers_to(shards):
    """A pipe: command cannot seek: its shards are read from the start, but only those the state names."""
    piped = {split: "::".join(f"pipe:cat {p}" for p in sorted(glob.glob(shards[split])))
             for split in ("trainA", "trainB")}
    cfg = data_cfg(piped)
    straight = batches(train_loader(cfg, seed=5, rank=1), 26)
    state = stopped_at(cfg, 20)
    streams = state_of(state)
    named = sum(len({ref[0] for ref in streams[domain]["samples"]["buffer"]}) for domain in "AB")
    READ.clear()
    resumed = batches(train_loader(cfg, seed=5, rank=1, state=state), 1)
    # Until the first batch: each shard the buffers refer to, and the shard each stream was reading (or the next).
    assert READ["opens"] <= named + 2 * 2
    resumed += batches(train_loader(cfg, seed=5, rank=1, state=state), 6)[1:]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(straight[20:], resumed))
    assert len(resumed) == 6


def state_of(loader_state):
    """The stream state of a 0-worker loader's dataset iterator."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            if {"A", "B"} <= set(value) and isinstance(value["A"], dict) and "samples" in value["A"]:
                found.append(value)
            for v in value.values():
                walk(v)

    walk(loader_state)
    return found[0]


def test_a_shard_emptied_since_the_checkpoint_costs_its_buffered_samples_with_a_warning(shards, tmp_path, caplog):
    """(A shard deleted or added changes the shard list, which the checkpoint's identity catches: new streams.)"""
    copies = {}
    for split in ("trainA", "trainB"):
        (tmp_path / split).mkdir()
        for path in sorted(glob.glob(shards[split])):
            (tmp_path / split / Path(path).name).write_bytes(Path(path).read_bytes())
        copies[split] = str(tmp_path / split / "*.tar")
    cfg = data_cfg(copies)
    state = stopped_at(cfg, 6)
    buffered = state_of(state)["A"]["samples"]["buffer"]
    urls = sorted(glob.glob(copies["trainA"]))
    Path(urls[buffered[0][0]]).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        resumed = batches(train_loader(cfg, seed=5, rank=1, state=state), 3)
    assert len(resumed) == 3
    lost = sum(ref[0] == buffered[0][0] for ref in buffered)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"{lost} of the {len(buffered)} samples the shuffle buffer held at the checkpoint can no longer be read" \
        in said and "no longer bit for bit" in said
