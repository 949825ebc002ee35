"""Checking WebDataset shards against their manifest (the `pipeline.shards inspect` command's library).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import statistics
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from webdataset.tariterators import base_plus_ext

from pipeline.data.pixels import NATIVE_KEYS, describe_header, png_bit_depth, read_native
from pipeline.data.shards import MANIFEST, NATIVE_ONLY, ShardError, error_reason, process_pool, verify_image
from pipeline.data.stream import expand_pattern, local_path

log = logging.getLogger(__name__)


@dataclass
class CorruptMember:
    """A sample whose image cannot be decoded (or that has none)."""

    shard: str
    key: str
    member: str
    error: str


@dataclass
class ShardReport:
    """What one shard holds and what is wrong with it."""

    url: str
    samples: int = 0
    """Samples (groups of members sharing a key)."""
    decoded: int = 0
    """Images fully decoded (all of them, or the sampled ones with --sample)."""
    bytes: int = 0
    sha256: str = ""
    corrupt: list[CorruptMember] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    """Bytes of each image member."""
    modes: dict[str, int] = field(default_factory=dict)
    """Image kinds and bit depths read from the headers ('RGB 8-bit', 'gray 16-bit', 'uint16 x4'), counted."""
    manifest: str = "no manifest"
    """ok, mismatch, not listed, or no manifest."""
    problems: list[str] = field(default_factory=list)
    """Everything wrong with the shard other than corrupt members (unreadable tar, manifest mismatch)."""


@dataclass
class InspectReport:
    """The result of `inspect_shards`."""

    pattern: str
    shards: list[ShardReport]
    manifest_path: str | None = None
    skipped_at_sharding: int = 0
    """Files the manifest says were skipped as unreadable when the shards were written."""

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def corrupt(self) -> list[CorruptMember]:
        return [c for s in self.shards for c in s.corrupt]

    @property
    def problems(self) -> list[str]:
        """One line per problem found, each naming its shard."""
        lines = [f"{s.url}: {p}" for s in self.shards for p in s.problems]
        lines += [f"{c.shard}: corrupt member {c.member} (key {c.key}): {c.error}" for c in self.corrupt]
        return lines

    @property
    def ok(self) -> bool:
        return not self.problems

    def modes(self) -> dict[str, int]:
        """Image kinds and bit depths over all shards, counted."""
        total: dict[str, int] = {}
        for shard in self.shards:
            for mode, count in shard.modes.items():
                total[mode] = total.get(mode, 0) + count
        return total

    def size_stats(self) -> dict[str, tuple[int, float, int]]:
        """(min, median, max) of image width, height and bytes over all images read."""
        stats = {}
        for name in ("widths", "heights", "sizes"):
            values = [v for s in self.shards for v in getattr(s, name)]
            if values:
                stats[{"widths": "width", "heights": "height", "sizes": "bytes"}[name]] = (
                    min(values), statistics.median(values), max(values))
        return stats


class _HashingReader:
    """Passes reads through to a stream while hashing and counting every byte."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _open(url: str) -> IO[bytes]:
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    from webdataset.gopen import gopen  # curl for http(s), a shell for pipe:

    return gopen(url, "rb")


def _verify(data: bytes, ext: str) -> tuple[int, int]:
    """Decode fully, as training does; returns (width, height)."""
    if ext in NATIVE_ONLY or png_bit_depth(data) == 16:
        array, _ = read_native(data, ext)
        return array.shape[1], array.shape[0]
    return verify_image(data)[1]


def inspect_shard(url: str, sample: int | None = None, seed: int = 0) -> ShardReport:
    """Read one shard as a stream: count samples, decode images, record sizes, sha256 and problems.

    Args:
        url: a local path, file:, pipe: or http(s) URL.
        sample: decode this many random samples (seeded by `seed` and the URL) instead of all.
        seed: seed of the sample choice.
    """
    report = ShardReport(url)
    rng = random.Random(f"{seed}:{url}")
    chosen: list[tuple[str, str, bytes, str]] = []  # Reservoir of (key, member, bytes, ext) to decode (--sample).
    seen_with_image = 0
    current_key: str | None = None
    current_has_image = False

    def end_sample() -> None:
        if current_key is not None and not current_has_image:
            missing = f"no image member ({', '.join(NATIVE_KEYS)})"
            report.corrupt.append(CorruptMember(url, current_key, "-", missing))

    try:
        stream = _open(url)
    except Exception as err:  # noqa: BLE001 - any failure to open is reported, not raised
        report.problems.append(f"cannot open: {error_reason(err)}")
        return report
    reader = _HashingReader(stream)
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, suffix = base_plus_ext(info.name)
                if key is None:
                    continue
                suffix = suffix.lower()
                if key != current_key:
                    end_sample()
                    current_key, current_has_image = key, False
                    report.samples += 1
                if suffix not in NATIVE_KEYS or current_has_image:
                    continue
                current_has_image = True
                data = tar.extractfile(info).read()
                report.sizes.append(len(data))
                try:
                    mode, (width, height) = describe_header(data, suffix)
                    if sample is None:
                        width, height = _verify(data, suffix)
                except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
                    report.corrupt.append(CorruptMember(url, key, info.name, error_reason(err)))
                    continue
                report.modes[mode] = report.modes.get(mode, 0) + 1
                report.widths.append(width)
                report.heights.append(height)
                if sample is None:
                    report.decoded += 1
                    continue
                seen_with_image += 1
                if len(chosen) < sample:
                    chosen.append((key, info.name, data, suffix))
                else:
                    index = rng.randrange(seen_with_image)
                    if index < sample:
                        chosen[index] = (key, info.name, data, suffix)
            end_sample()
        reader.drain()  # The end-of-archive blocks and padding count in the sha256 too.
    except Exception as err:  # noqa: BLE001 - truncated or garbled tars, failing pipe commands
        report.problems.append(f"unreadable after {report.samples} sample(s): {error_reason(err)}")
    finally:
        try:
            stream.close()
        except Exception as err:  # noqa: BLE001 - webdataset's pipe raises here on a non-zero exit
            report.problems.append(f"closing the stream failed: {error_reason(err)}")
    for key, member, data, ext in chosen:
        try:
            _verify(data, ext)
            report.decoded += 1
        except Exception as err:  # noqa: BLE001
            report.corrupt.append(CorruptMember(url, key, member, error_reason(err)))
    report.bytes, report.sha256 = reader.size, reader.digest.hexdigest()
    return report


def find_manifest(urls: list[str], manifest: str | os.PathLike[str] | None = None) -> Path | None:
    """The manifest to check shards against: `manifest` (a file or a folder holding manifest.json), else the
    manifest.json in the first local shard's folder's parent (OUT/ for OUT/trainA/x.tar) or in that folder.

    Raises:
        ShardError: an explicit `manifest` that does not exist.
    """
    if manifest is not None:
        path = Path(manifest)
        path = path / MANIFEST if path.is_dir() else path
        if not path.is_file():
            raise ShardError(f"manifest '{manifest}' does not exist")
        return path
    for url in urls:
        path = local_path(url)
        if path is not None:
            folder = Path(path).resolve().parent
            for candidate in (folder.parent / MANIFEST, folder / MANIFEST):
                if candidate.is_file():
                    return candidate
            return None
    return None


def _check_manifest(reports: list[ShardReport], path: Path) -> int:
    """Compare every shard with its manifest entry (by resolved path, or by path suffix for URLs)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        listed = {s["path"]: s for entry in manifest["splits"].values() for s in entry["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ShardError(f"'{path}' is not a shard manifest: {err}") from None
    by_path = {str((path.parent / rel).resolve()): entry for rel, entry in listed.items()}
    for report in reports:
        local = local_path(report.url)
        if local is not None:
            entry = by_path.get(str(Path(local).resolve()))
        else:
            # A URL or command names the shard somewhere inside it: match the manifest path as a whole word.
            entry = next((e for rel, e in listed.items()
                          if re.search(rf"(^|[/\s:'\"]){re.escape(rel)}($|[\s'\"])", report.url)), None)
        if entry is None:
            report.manifest = "not listed"
            report.problems.append(f"not listed in {path}")
            continue
        wrong = []
        if report.sha256 != entry["sha256"]:
            wrong.append(f"sha256 {report.sha256[:12]}... but the manifest has {entry['sha256'][:12]}...")
        if report.bytes != entry["bytes"]:
            wrong.append(f"{report.bytes} bytes but the manifest has {entry['bytes']}")
        if report.samples != entry["count"] and not any(p.startswith("unreadable") for p in report.problems):
            wrong.append(f"{report.samples} samples but the manifest has {entry['count']}")
        report.manifest = "mismatch" if wrong else "ok"
        report.problems.extend(f"differs from {path}: {w}" for w in wrong)
    return len(manifest.get("skipped", []))


def _inspect_args(args: tuple[str, int | None, int]) -> ShardReport:
    return inspect_shard(*args)


def inspect_shards(pattern: str, sample: int | None = None, manifest: str | os.PathLike[str] | None = None,
                   workers: int = 1, seed: int = 0) -> InspectReport:
    """Inspect every shard of a pattern and check them against their manifest.

    Args:
        pattern: shard pattern as training accepts it (pipeline.data.stream.expand_pattern).
        sample: decode this many random samples per shard instead of all.
        manifest: manifest file or folder to check against; None looks beside the shards.
        workers: processes inspecting shards in parallel (one shard each at a time).
        seed: seed of the `sample` choice.

    Raises:
        pipeline.data.stream.DataError: the pattern matches nothing.
        ShardError: an explicit manifest that does not exist or cannot be read.
    """
    if sample is not None and sample < 1:
        raise ShardError(f"--sample must be positive, got {sample}")
    urls = expand_pattern(pattern)
    path = find_manifest(urls, manifest)
    tasks = [(url, sample, seed) for url in urls]
    pool: ProcessPoolExecutor | None = process_pool(min(workers, len(urls)))
    if pool is None:
        reports = [_inspect_args(task) for task in tasks]
    else:
        with pool:
            reports = list(pool.map(_inspect_args, tasks))
    skipped = _check_manifest(reports, path) if path is not None else 0
    return InspectReport(pattern, reports, str(path) if path else None, skipped)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def print_report(report: InspectReport, stream: IO[str] | None = None) -> None:
    """The report as a table of shards, then corrupt members, sizes, the manifest check and the verdict."""
    out = stream or sys.stdout
    names = [s.url for s in report.shards]
    width = min(max(len(n) for n in names), 80)
    print(f"{'shard':<{width}}  {'samples':>8}  {'decoded':>8}  {'corrupt':>8}  {'size':>9}  manifest", file=out)
    for s in report.shards:
        name = s.url if len(s.url) <= width else "..." + s.url[-(width - 3) :]
        state = s.manifest if not any(p.startswith("unreadable") or p.startswith("cannot") for p in s.problems) \
            else "unreadable"
        print(f"{name:<{width}}  {s.samples:>8}  {s.decoded:>8}  {len(s.corrupt):>8}  {_human(s.bytes):>9}  {state}",
              file=out)
    print(f"{len(report.shards)} shard(s), {report.samples} samples", file=out)
    if report.corrupt:
        print(f"corrupt members ({len(report.corrupt)}):", file=out)
        for c in report.corrupt:
            print(f"  {c.shard}: {c.member} (key {c.key}): {c.error}", file=out)
    modes = report.modes()
    if modes:
        print("images: " + ", ".join(f"{count} {mode}" for mode, count in sorted(modes.items())), file=out)
        for s in report.shards:
            if len(modes) > 1 and s.modes:
                print(f"  {s.url}: " + ", ".join(f"{n} {m}" for m, n in sorted(s.modes.items())), file=out)
    stats = report.size_stats()
    if stats:
        shown = [f"{k} {v[0]} / {v[1]:g} / {v[2]}" if k != "bytes" else
                 f"{k} {_human(v[0])} / {_human(v[1])} / {_human(v[2])}" for k, v in stats.items()]
        print("sizes (min / median / max): " + ", ".join(shown), file=out)
    if report.manifest_path:
        checked = sum(s.manifest in ("ok", "mismatch") for s in report.shards)
        bad = sum(s.manifest == "mismatch" for s in report.shards)
        print(f"manifest {report.manifest_path}: {checked} shard(s) checked, {bad} differ"
              + (f"; {report.skipped_at_sharding} file(s) were skipped as unreadable at sharding time"
                 if report.skipped_at_sharding else ""), file=out)
    else:
        print("no manifest found beside the shards (pass --manifest): sha256 not checked", file=out)
    if report.ok:
        print("OK: no problems found", file=out)
    else:
        print(f"PROBLEMS ({len(report.problems)}):", file=out)
        for line in report.problems:
            print(f"  {line}", file=out)
