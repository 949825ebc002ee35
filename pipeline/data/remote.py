"""Reading one shard's samples, and reading network shards again when their server goes away mid-read.

Network shards (http(s)://, and pipe: commands such as `pipe:aws s3 cp ... -`) are read again after a failure
from the first sample not yet delivered (http(s) by a range request; a pipe: from its start, skipping what was
delivered), so a stream continues exactly where it stopped. A shard that keeps failing for `retry_s` seconds
(without delivering a sample) ends the run with an error naming it.
"""

from __future__ import annotations

import logging
import tarfile
import time
import urllib.error
from collections.abc import Iterator

from pipeline.data.shard_reader import START, Located, Position, read_samples

log = logging.getLogger(__name__)


class ShardUnreachable(RuntimeError):
    """A network shard that could not be read within the retry time."""


class BadShard(RuntimeError):
    """A network shard that was read but is not usable: reading it again cannot help."""


def shard_problem(err: BaseException) -> str:
    """A shard's read error in words: `tarfile`'s ReadError carries a tuple; a BadShard is worded already."""
    if isinstance(err, BadShard):
        return str(err)
    if isinstance(err, tarfile.ReadError) and err.args and isinstance(err.args[0], str):
        what = err.args[0].split(" @ ")[0]  # webdataset appends " @ <the stream>"
        known = {"empty file": "an empty file (0 bytes: an interrupted copy?)",
                 "invalid header": "not a tar file (invalid header)",
                 "unexpected end of data": "truncated (unexpected end of data)"}
        return known.get(what, f"not a readable tar ({what})")
    if isinstance(err, FileNotFoundError):
        return "it no longer exists (deleted or moved since the run started)"
    if isinstance(err, PermissionError):
        return "it cannot be read (permission denied)"
    if isinstance(err, OSError):
        return f"it cannot be read ({err.strerror or err})"
    return f"{type(err).__name__}: {err}"


def _transient_local(err: BaseException) -> bool:
    """A local shard's read error that may pass (EIO, ESTALE of a network filesystem, a timeout): read it again
    as a network shard is. A missing or unreadable file, or bytes that are no tar, are the shard's own."""
    return isinstance(err, OSError) and not isinstance(
        err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def _content_problem(url: str, err: BaseException) -> str | None:
    """Why an http(s) shard that the server answered is bad in itself (missing, not a tar), or None for a failure
    worth retrying. (pipe: commands cannot tell a cut connection from a cut file: they are retried.)"""
    if not url.startswith(("http://", "https://")):
        return None
    if isinstance(err, urllib.error.HTTPError) and err.code in (401, 403, 404, 410):
        return f"the server answers HTTP {err.code} ({err.reason})"
    if isinstance(err, tarfile.TarError):
        return shard_problem(err)
    return None


def is_remote(url: str) -> bool:
    return ("://" in url and not url.startswith("file://")) or url.startswith("pipe:")


def retrying_samples(url: str, retry_s: float, sleep=time.sleep, start: Position = START) -> Iterator[Located]:
    """`read_samples(url, start)`, continued after a failure of a network shard or a transient read error of a
    local one from the sample that failed (an http(s) shard by a range request, a pipe: from its start); other
    local failures, and HTTP answers that the shard is bad, raise at once.

    Raises:
        ShardUnreachable: the shard failed for `retry_s` seconds in a row, naming the URL and the last error.
    """
    at, failing_since, attempt = start, None, 0
    while True:
        try:
            for item in read_samples(url, at):
                at = item.end
                failing_since, attempt = None, 0
                yield item
            return
        except Exception as err:  # noqa: BLE001 - urllib, tarfile, webdataset and pipes raise many types
            if not is_remote(url) and not _transient_local(err):
                raise
            problem = _content_problem(url, err)
            if problem is not None:
                raise BadShard(problem) from None
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            now = time.monotonic()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since >= retry_s:
                raise ShardUnreachable(
                    f"shard {url} could not be read for {now - failing_since:.0f} s (data.remote_retry_s="
                    f"{retry_s:g}): {reason}. Check that its server is up and the URL is right; the run "
                    "resumes from its last checkpoint when started again") from None
            attempt += 1
            delay = min(2.0 ** attempt, 10.0, max(retry_s - (now - failing_since), 0.1))
            log.warning("shard %s failed after %d sample(s) (%s); retrying in %.0f s (the run stops if it keeps "
                        "failing for %g s: data.remote_retry_s)", url, at.index, reason, delay, retry_s)
            sleep(delay)
