"""Network shards: read over real HTTP (a local server), read again after a server fails mid-shard, and a server
that stays away ends the stream after data.remote_retry_s with an error naming the URL."""

from __future__ import annotations

import errno
import glob
import logging
import tarfile
from pathlib import Path

import pytest
from support.http_server import Server

from pipeline.data.remote import ShardUnreachable, retrying_samples
from pipeline.data.shard_reader import read_samples


@pytest.fixture
def shard(shards) -> Path:
    return Path(sorted(glob.glob(shards["trainA"]))[0])


def keys(items) -> list[str]:
    return [item.sample["__key__"] for item in items]


def test_http_shard_has_the_samples_of_the_file(shard):
    server = Server(shard.parent)
    try:
        got = list(read_samples(f"{server.url}/{shard.name}"))
    finally:
        server.close()
    want = list(read_samples(str(shard)))
    assert keys(got) == keys(want) and len(got) == 16
    assert all(g.sample["png"] == w.sample["png"] for g, w in zip(got, want))
    assert [g.start for g in got] == [w.start for w in want]


def test_a_server_failing_mid_shard_is_read_again_and_each_sample_comes_once(shard, caplog):
    server = Server(shard.parent, fail_after=shard.stat().st_size // 2, failures=2)
    try:
        with caplog.at_level(logging.WARNING):
            got = list(retrying_samples(f"{server.url}/{shard.name}", retry_s=30, sleep=lambda s: None))
    finally:
        server.close()
    assert keys(got) == keys(read_samples(str(shard)))  # In order, none twice, none lost.
    assert server.requests == 3
    # Each read after a cut asks for the rest of the shard from the first sample not yet delivered.
    assert server.ranges[0] == ""
    starts = [int(r.removeprefix("bytes=").rstrip("-")) for r in server.ranges[1:]]
    assert 0 < starts[0] <= shard.stat().st_size // 2 < starts[1]
    assert server.sent < 2 * shard.stat().st_size  # Nothing is downloaded twice but a part of one sample.
    warnings = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(warnings) == 2 and f"{server.url}/{shard.name}" in warnings[0]
    assert "data.remote_retry_s" in warnings[0]


def test_a_server_that_stays_away_ends_the_stream_naming_the_url(shard):
    server = Server(shard.parent)
    url = f"{server.url}/{shard.name}"
    server.close()
    slept = []
    with pytest.raises(ShardUnreachable, match=rf"shard {url} could not be read for \d+ s \(data.remote_retry_s=2\)"):
        list(retrying_samples(url, retry_s=2, sleep=lambda s: (slept.append(s), __import__("time").sleep(s))))
    assert slept and sum(slept) <= 2.5  # Bounded: the waits add up to the retry time, no more.


def test_local_shards_fail_at_once(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar")
    slept = []
    with pytest.raises(tarfile.ReadError):
        list(retrying_samples(str(bad), retry_s=30, sleep=slept.append))
    assert slept == []


def test_a_transient_read_error_of_a_local_shard_is_read_again_and_each_sample_comes_once(shard, monkeypatch):
    """EIO or ESTALE from a network filesystem passes; a missing file or a broken tar does not (tested above)."""
    from pipeline.data import remote

    real, calls = remote.read_samples, []

    def flaky(url, start):
        calls.append(start)
        for index, item in enumerate(real(url, start)):
            if len(calls) == 1 and index == 3:
                raise OSError(errno.EIO, "Input/output error")
            yield item

    monkeypatch.setattr(remote, "read_samples", flaky)
    slept = []
    got = list(retrying_samples(str(shard), retry_s=30, sleep=slept.append))
    assert keys(got) == keys(real(str(shard))) and len(calls) == 2 and len(slept) == 1
    assert calls[1].index == 3 and calls[1].offset > 0  # Read again from the sample that failed, by a seek.
