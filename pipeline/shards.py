"""Image folders in the reference layout -> WebDataset tar shards per split, plus a manifest.

`python -m pipeline.shards SRC OUT [--maxcount N] [--maxsize BYTES] [--splits trainA,trainB,testA,testB]
[--overwrite]` reads SRC/trainA, trainB, testA, testB (JPEG/PNG/WebP, subfolders allowed, sorted order) and
writes OUT/<split>/<split>-000000.tar ... and OUT/manifest.json (counts, sizes, sha256 per shard, skipped files).

Every image is decoded once to prove it readable; unreadable files are skipped and listed, never fatal. The
original bytes are stored unchanged. Tars are byte-identical on every run (fixed order, mtime, owner, mode).
Each shard is written under a temporary name and renamed when complete, and the manifest is written last, so a
half-written output never looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

SPLITS = ("trainA", "trainB", "testA", "testB")
EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
MANIFEST = "manifest.json"


class ShardError(RuntimeError):
    """The output cannot be written as asked."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_key(relative: Path) -> str:
    """WebDataset key of a file: its path under the split without extension; '.' would split the key."""
    return relative.with_suffix("").as_posix().replace("/", "_").replace(".", "_")


def _validate(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.convert("RGB").load()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _member_bytes(name: str, data: bytes) -> int:
    """Bytes a member takes in the tar: a 512-byte header and the data padded to 512."""
    return 512 + (len(data) + 511) // 512 * 512


class _ShardSink:
    """Writes numbered shards of one split, each through a temporary file and a rename."""

    def __init__(self, folder: Path, split: str, maxcount: int, maxsize: int) -> None:
        self.folder, self.split = folder, split
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._size = 0

    def _open(self) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.split}-", suffix=".tar.tmp", dir=self.folder)
        os.close(fd)
        self._tmp = Path(tmp)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count, self._size = 0, 1024  # The end-of-archive blocks.

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self.folder / f"{self.split}-{len(self.shards):06d}.tar"
        os.replace(self._tmp, path)
        rel = f"{self.split}/{path.name}"
        self.shards.append({"path": rel, "count": self._count, "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})
        self._tar, self._tmp = None, None

    def add(self, members: list[tuple[str, bytes]]) -> None:
        size = sum(_member_bytes(n, d) for n, d in members)
        if self._tar is not None and (self._count >= self.maxcount or self._size + size > self.maxsize):
            self.close()
        if self._tar is None:
            self._open()
        for name, data in members:
            _add_member(self._tar, name, data)
        self._count += 1
        self._size += size

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def write_shards(src: Path, out: Path, splits: Sequence[str] = SPLITS, maxcount: int = 1000,
                 maxsize: int = 1 << 30, overwrite: bool = False) -> dict[str, Any]:
    """Shard the reference layout under `src` into `out`; returns the manifest (also written to out).

    Raises:
        ShardError: no split folder exists, or `out` holds shards or a manifest and `overwrite` is False.
    """
    src, out = Path(src), Path(out)
    present = [s for s in splits if (src / s).is_dir()]
    if not present:
        raise ShardError(f"'{src}' has none of the split folders {', '.join(splits)} (the reference layout)")
    if out.exists() and ((out / MANIFEST).exists() or any(out.rglob("*.tar"))):
        if not overwrite:
            raise ShardError(f"'{out}' already holds shards or a manifest; pass --overwrite to replace them")
        (out / MANIFEST).unlink(missing_ok=True)  # First, so an interrupted overwrite never looks complete.
        for split in present:
            for old in (out / split).glob(f"{split}-*.tar"):
                old.unlink()
    manifest: dict[str, Any] = {"version": 1, "source": str(src), "splits": {}, "skipped": []}
    for split in present:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        sink = _ShardSink(folder, split, maxcount, maxsize)
        count = 0
        try:
            for path in _image_files(src / split):
                relative = path.relative_to(src / split)
                data = path.read_bytes()
                try:
                    _validate(data)
                except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
                    reason = f"{type(err).__name__}: {err}"
                    log.warning("skipping unreadable image %s (%s)", path, reason)
                    manifest["skipped"].append({"path": str(path), "reason": reason})
                    continue
                key = sample_key(relative)
                sink.add([(f"{key}.{EXTENSIONS[path.suffix.lower()]}", data),
                          (f"{key}.name.txt", relative.as_posix().encode())])
                count += 1
            sink.close()
        except BaseException:
            sink.abort()
            raise
        shards = sink.shards
        pattern = f"{split}/{split}-{{000000..{len(shards) - 1:06d}}}.tar" if shards else ""
        manifest["splits"][split] = {"count": count, "pattern": pattern, "shards": shards}
        if not count:
            log.warning("split %s in %s holds no readable images", split, src)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def load_manifest(out: Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST
    if not path.exists():
        raise ShardError(f"'{path}' does not exist: the output is incomplete or was not made by pipeline.shards")
    return json.loads(path.read_text())


def split_pattern(out: Path, split: str) -> str:
    """Absolute brace pattern of one split's shards, for data.train_a and friends."""
    entry = load_manifest(out)["splits"].get(split)
    if not entry or not entry["pattern"]:
        raise ShardError(f"'{out}' has no shards for split {split}")
    return str(Path(out).resolve() / entry["pattern"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.shards", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="folder with trainA/ trainB/ testA/ testB/")
    parser.add_argument("out", type=Path, help="output folder for shards and manifest.json")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--maxsize", type=int, default=1 << 30, help="bytes per shard at most")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated split folders")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        manifest = write_shards(args.src, args.out, args.splits.split(","), args.maxcount, args.maxsize,
                                args.overwrite)
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, entry in manifest["splits"].items():
        size = sum(s["bytes"] for s in entry["shards"])
        print(f"{split}: {entry['count']} images in {len(entry['shards'])} shard(s), {size / 1e6:.1f} MB")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable file(s): see {args.out / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
