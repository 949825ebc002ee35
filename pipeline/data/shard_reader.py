"""One shard's samples, each with where it lies in the shard: read from any sample on, and any sample again.

A stream's checkpointed state names samples by position (a byte offset and a sample count), so a resumed stream
reads only what it still needs: a local shard seeks, an http(s) shard asks for a byte range (as object stores
serve them), and a `pipe:` or compressed shard, which cannot seek, is read from its start up to the position.

Samples are grouped from the tar's members exactly as webdataset's `tarfile_samples` groups them (same keys,
same skipped metadata members), so a stream reads the same samples through either.
"""

from __future__ import annotations

import io
import re
import tarfile
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

# Seconds an http(s) connection or read may stall before it counts as a failure (and is retried). http(s) is read
# here, not through webdataset's curl, which retries 30 times 2 s apart before anything is reported.
HTTP_TIMEOUT_S = 30.0

# Bytes read from shards and shards opened by this process (a benchmark's measure of what a resume costs).
READ: Counter[str] = Counter()
_COUNTING = threading.Lock()

# Range requests in flight at once while a resumed stream fetches its buffer: each costs a round trip to the store
# (adjacent samples share one), so a buffer of 512 samples would otherwise wait 512 round trips.
_PARALLEL_RANGES = 8

_META = re.compile(r"__[^/]*__($|/)")


@dataclass(frozen=True)
class Position:
    """Where a sample starts in its shard: the byte offset of its first tar header, and how many samples come
    before it (what a shard that cannot seek skips)."""

    offset: int = 0
    index: int = 0


START = Position()


@dataclass
class Located:
    """A sample with its place: it starts at `start`, and the next one at `end`."""

    sample: dict[str, Any]
    start: Position
    end: Position


def seekable(url: str) -> bool:
    """Whether reading `url` can start at a byte offset: local files and http(s), uncompressed. (pipe: commands
    and other schemes, which webdataset opens through a command, are read from their start.)"""
    local = "://" not in url and not url.startswith("pipe:")
    return (local or url.startswith(("http://", "https://"))) and not url.endswith((".gz", ".tgz"))


def _count(key: str, n: int) -> None:
    with _COUNTING:  # Range requests run on several threads.
        READ[key] += n


class _Body(io.RawIOBase):
    """A shard's raw bytes, counted in READ as they are read. With `expected` (an HTTP body's Content-Length), a
    connection that ends before that many bytes raises: a streamed tar read that simply stops looks like the end
    of the archive to `tarfile` (an empty header), so a server dying between two members would silently drop the
    rest of the shard."""

    def __init__(self, raw: Any, expected: int | None = None) -> None:
        self.raw, self.expected, self.got = raw, expected, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if hasattr(self.raw, "readinto"):
            n = self.raw.readinto(buffer) or 0
        else:  # webdataset's Pipe reads only
            data = self.raw.read(len(buffer))
            n = len(data)
            buffer[:n] = data
        self.got += n
        _count("bytes", n)
        if n == 0 and self.expected is not None and self.got < self.expected:
            raise ConnectionError(f"connection closed after {self.got} of {self.expected} bytes")
        return n

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


def _http(url: str, first: int, last: int | None = None) -> Any:
    """The bytes of `url` from `first` (to `last`, inclusive), by a Range request when not from 0. A server that
    ignores ranges answers the whole file: its first bytes are dropped here."""
    headers = {"Range": f"bytes={first}-{'' if last is None else last}"} if first or last is not None else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # Nothing from `first` on: the shard ends there.
            return io.BytesIO(b"")
        raise
    length = response.headers.get("Content-Length")
    body = _Body(response, int(length) if length and length.isdigit() else None)
    if first and response.status != 206:
        _drop(body, first)
    return body


def _read_exactly(stream: Any, count: int) -> bytes:
    """`count` bytes of `stream` (a raw stream's read may return fewer), or fewer at its end."""
    parts = []
    while count > 0:
        chunk = stream.read(count)
        if not chunk:
            break
        parts.append(chunk)
        count -= len(chunk)
    return b"".join(parts)


def _drop(stream: Any, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            return
        count -= len(chunk)


def open_bytes(url: str, offset: int = 0) -> BinaryIO:
    """The bytes of shard `url` from byte `offset` on (only 0 for a shard that is not `seekable`)."""
    _count("opens", 1)
    if url.startswith(("http://", "https://")):
        body = _http(url, offset)
    elif url.startswith("pipe:") or "://" in url:
        body = _Body(gopen(url, "rb"))
        _drop(body, offset)
    else:
        raw = open(url.removeprefix("file:"), "rb", buffering=0)  # noqa: SIM115 - closed with the stream
        raw.seek(offset)
        body = _Body(raw)
    return io.BufferedReader(body, buffer_size=1 << 16)


def read_samples(url: str, start: Position = START) -> Iterator[Located]:
    """The samples of shard `url` from `start` on, in order, with their positions.

    A seekable shard is opened at `start.offset`; one that cannot seek (or whose bytes at the offset are not a
    tar header: a compressed file under a .tar name) is read from its start, `start.index` samples skipped.
    """
    if start.index and seekable(url):
        stream = open_bytes(url, start.offset)
        try:
            if not stream.peek(1):
                return  # At the end of a shard written without end-of-archive blocks.
            try:
                items = _located(url, stream, start)
                first = next(items, None)
            except tarfile.ReadError:
                first = items = None
            if items is not None:
                if first is not None:
                    yield first
                    yield from items
                return
        finally:
            stream.close()
    with open_bytes(url) as stream:
        for item in _located(url, stream, START):
            if item.start.index >= start.index:
                yield item


def _located(url: str, stream: BinaryIO, base: Position) -> Iterator[Located]:
    """Samples of the tar in `stream`, which starts at `base` in its shard (webdataset's grouping)."""
    tar = tarfile.open(fileobj=stream, mode="r|*" if base == START else "r|")
    current: dict[str, Any] | None = None
    start = base
    index = base.index
    end_of_data = base.offset
    for info in tar:
        name = info.name
        if not info.isreg() or name is None:
            continue
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
            continue
        data = tar.extractfile(info).read()
        tar.members = []
        header = base.offset + info.offset
        end_of_data = base.offset + info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        prefix, suffix = base_plus_ext(name)
        if prefix is None:
            continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"]:
            if current is not None:
                yield Located(current, start, Position(header, index + 1))
                index += 1
            current, start = {"__key__": prefix, "__url__": url}, Position(header, index)
        if suffix in current:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix} {list(current)}")
        current[suffix] = data
    if current is not None:
        yield Located(current, start, Position(end_of_data, index + 1))


def fetch(url: str, spans: Iterable[tuple[Position, Position]]) -> dict[Position, dict[str, Any]]:
    """The samples of shard `url` at `spans` ((start, end) positions read before), by start position.

    A seekable shard reads just those bytes: a local one a seek and a read per run of adjacent samples, an
    http(s) one a range request per run (several at once). One that cannot seek is read from its start to the
    last of them.
    """
    wanted = sorted(set(spans), key=lambda span: span[0].offset)
    if not wanted:
        return {}
    found: dict[Position, dict[str, Any]] = {}
    starts = {start for start, _ in wanted}
    if not seekable(url):
        last = max(start.index for start in starts)
        for item in read_samples(url):
            if item.start in starts:
                found[item.start] = item.sample
            if item.start.index >= last:
                break
        return found
    remote = url.startswith(("http://", "https://"))
    runs = _runs(wanted)

    def read(run: tuple[Position, Position]) -> list[Located]:
        with _range(url, run[0].offset, run[1].offset) as stream:
            return [item for item in _located(url, stream, run[0]) if item.start in starts]

    # Range requests wait on the network more than on anything here: several at once.
    with ThreadPoolExecutor(_PARALLEL_RANGES if remote else 1) as pool:
        for items in pool.map(read, runs):
            found.update({item.start: item.sample for item in items})
    return found


def _runs(wanted: list[tuple[Position, Position]]) -> list[tuple[Position, Position]]:
    """Spans (sorted by start) merged into runs (first start, last end) where one ends where the next starts: a
    read of each run reads the buffered samples' bytes and nothing else."""
    runs = [list(wanted[0])]
    for start, end in wanted[1:]:
        if start.offset > runs[-1][1].offset:
            runs.append([start, end])
        elif end.offset > runs[-1][1].offset:
            runs[-1][1] = end
    return [(first, end) for first, end in runs]


def _range(url: str, first: int, end: int) -> BinaryIO:
    """Bytes `first` to `end` (exclusive) of a seekable shard, followed by an end-of-archive block."""
    _count("opens", 1)
    if url.startswith(("http://", "https://")):
        with _http(url, first, end - 1) as body:
            data = _read_exactly(body, end - first)
    else:
        with open(url.removeprefix("file:"), "rb") as file:
            file.seek(first)
            data = file.read(end - first)
        _count("bytes", len(data))
    return io.BytesIO(data + bytes(2 * tarfile.BLOCKSIZE))
