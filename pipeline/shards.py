"""Image folders in the reference layout -> WebDataset tar shards per split, plus a manifest.

`python -m pipeline.shards SRC OUT [--maxcount N] [--maxsize BYTES] [--splits trainA,trainB,testA,testB]
[--overwrite]` reads SRC/trainA, trainB, testA, testB (JPEG/PNG/WebP, subfolders allowed, sorted order)
and writes OUT/<split>/<split>-000000.tar ... and OUT/manifest.json (counts, sizes, sha256 per shard, skipped
files).

Every image is fully decoded once to prove it readable; unreadable files are skipped and listed, never fatal.
The original bytes are stored unchanged, with the file's relative name in `<key>.name.txt`. Tars are
byte-identical on every run (fixed order, mtime, owner, mode). Each shard is written under a temporary name
and renamed when complete, and the manifest is written last, so a half-written output never looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

SPLITS = ("trainA", "trainB", "testA", "testB")
EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> member extension.
MANIFEST = "manifest.json"
VERSION = 1
DEFAULT_MAXCOUNT = 1000
DEFAULT_MAXSIZE = 10**9
TAR_FORMAT = tarfile.PAX_FORMAT  # Long and non-ASCII names; deterministic for fixed metadata.
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ShardError(RuntimeError):
    """The output cannot be written (or read) as asked; the message says what to do."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_key(relative: str) -> str:
    """WebDataset key of a file from its '/'-separated path under the split folder.

    The extension is dropped, and '/' and '.' become '_': WebDataset splits a member name at its first dot.
    """
    return PurePosixPath(relative).with_suffix("").as_posix().replace("/", "_").replace(".", "_")


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, extension case-insensitive), sorted by relative path string."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _verify_image(data: bytes) -> str | None:
    """Decode `data` fully (raises if it is not a readable image); returns its member extension if known."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img.convert("RGB")  # Palette and CMYK files must convert too; training calls this.
        return FORMATS.get(img.format or "")


def _fsync_dir(folder: Path) -> None:
    # Makes a rename durable; not every platform can open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _tar_size(member_bytes: int) -> int:
    """File size of a tar whose members take `member_bytes`: two zero end blocks, padded to a full record."""
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardWriter:
    """Writes the numbered shards of one split, each through a temporary file and an atomic rename.

    A shard closes before a sample that would take it past `maxcount` samples or `maxsize` bytes (its exact
    final size, record padding included); a sample larger than `maxsize` gets a shard of its own.
    """

    def __init__(self, folder: Path, split: str, maxcount: int, maxsize: int) -> None:
        self.folder, self.split = folder, split
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shards: list[dict[str, Any]] = []
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._member_bytes = 0

    def _path(self) -> Path:
        return self.folder / f"{self.split}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        # Created with open(), not mkstemp, so the shard gets the umask's mode rather than 0o600.
        self._tmp = self.folder / f".{self._path().name}.{os.getpid()}.tmp"
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=TAR_FORMAT, encoding="utf-8")
        self._count, self._member_bytes = 0, 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """Append one sample (its members, in order), starting a new shard first if this one is full."""
        infos = [_tar_info(name, len(data)) for name, data in members]
        size = sum(
            len(info.tobuf(TAR_FORMAT, "utf-8", "surrogateescape")) + -(-len(data) // 512) * 512
            for info, (_, data) in zip(infos, members)
        )
        if self._tar is not None and (
            self._count >= self.maxcount or _tar_size(self._member_bytes + size) > self.maxsize
        ):
            self.close()
        if self._tar is None:
            self._open()
        if _tar_size(size) > self.maxsize:
            log.warning("sample %s alone is %d bytes, over --maxsize %d: it gets a shard of its own",
                        members[0][0], _tar_size(size), self.maxsize)
        for info, (_, data) in zip(infos, members):
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._member_bytes += size

    def close(self) -> None:
        """Finish the open shard (if any): flush, fsync, rename into place, record it."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        path = self._path()
        os.replace(self._tmp, path)
        self.shards.append({"path": f"{self.split}/{path.name}", "count": self._count,
                            "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        log.info("wrote %s (%d samples, %.1f MB)", path, self._count, path.stat().st_size / 1e6)
        self._tar = self._file = self._tmp = None

    def abort(self) -> None:
        """Drop the open shard's temporary file; shards already renamed stay (the manifest is not written)."""
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None


def _shard_files(folder: Path, split: str) -> list[Path]:
    """Shards of `split` in `folder` and temporary files left by an interrupted run."""
    names = re.compile(rf"{re.escape(split)}-\d{{6,}}\.tar|\.{re.escape(split)}-\d{{6,}}\.tar\.\d+\.tmp")
    return sorted(p for p in folder.glob("*") if names.fullmatch(p.name)) if folder.is_dir() else []


def _write_split(folder: Path, dest: Path, split: str, maxcount: int, maxsize: int,
                 skipped: list[dict[str, str]]) -> dict[str, Any]:
    """Shard one split folder into `dest`; unreadable files are appended to `skipped`."""
    dest.mkdir(parents=True, exist_ok=True)
    for stale in _shard_files(dest, split):
        if stale.suffix == ".tmp":
            stale.unlink()
    writer = _ShardWriter(dest, split, maxcount, maxsize)
    used: set[str] = set()
    count = 0
    try:
        for path in list_images(folder):
            relative = path.relative_to(folder).as_posix()
            try:
                name = relative.encode("utf-8")
                data = path.read_bytes()
                ext = _verify_image(data) or EXTENSIONS[path.suffix.lower()]
            except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...).
                reason = f"{type(err).__name__}: {err}"
                if isinstance(err, UnicodeEncodeError):
                    reason = "file name is not valid UTF-8"
                elif isinstance(err, UnidentifiedImageError):  # Its message holds a BytesIO address.
                    reason = "UnidentifiedImageError: not an image format PIL can read"
                log.warning("skipping unreadable image %s (%s)", path, reason)
                skipped.append({"split": split, "path": f"{split}/{relative}", "reason": reason})
                continue
            key = base = sample_key(relative)
            suffix = 1
            while key in used:  # a.png and a.jpg, or a.b.png and a_b.png, would share a key.
                key, suffix = f"{base}_{suffix}", suffix + 1
            if key != base:
                log.warning("key %s of %s is taken; using %s", base, path, key)
            used.add(key)
            writer.add([(f"{key}.{ext}", data), (f"{key}.name.txt", name)])
            count += 1
        writer.close()
    except BaseException:
        writer.abort()
        raise
    shards = writer.shards
    if not shards:
        pattern = None
    elif len(shards) == 1:
        pattern = shards[0]["path"]
    else:
        pattern = f"{split}/{split}-{{000000..{len(shards) - 1:06d}}}.tar"
    if not count:
        log.warning("split %s (%s) holds no readable images: no shards written", split, folder)
    return {"count": count, "pattern": pattern, "shards": shards}


def _previous_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return load_manifest(out)
    except (ShardError, OSError, ValueError) as err:
        log.warning("ignoring the previous manifest in %s: %s", out, err)
        return None


def _check_splits(splits: Sequence[str]) -> list[str]:
    splits = list(splits)
    bad = [s for s in splits if not _SPLIT_NAME.fullmatch(s)]
    if not splits or bad or len(set(splits)) != len(splits):
        raise ShardError(f"splits must be distinct folder names (letters, digits, '_', '-'), got {splits}")
    return splits


def write_shards(src: str | os.PathLike[str], out: str | os.PathLike[str], splits: Sequence[str] = SPLITS,
                 maxcount: int = DEFAULT_MAXCOUNT, maxsize: int = DEFAULT_MAXSIZE,
                 overwrite: bool = False) -> dict[str, Any]:
    """Shard the reference layout under `src` into `out`; returns the manifest (also out/manifest.json).

    Args:
        src: folder holding some of the split folders (trainA/, trainB/, testA/, testB/).
        out: output folder; created if missing.
        splits: split folders to shard; those missing under `src` are left out (at least one must exist).
        maxcount: samples per shard at most.
        maxsize: bytes per shard at most (a single larger sample still gets a shard of its own).
        overwrite: allow an `out` that already holds a manifest or tars. The shards of the splits written
            are removed first; other splits' entries in the previous manifest are kept if their files are
            intact.

    Raises:
        ShardError: bad arguments, no split folder under `src`, or `out` holds shards or a manifest and
            `overwrite` is False.
    """
    src, out = Path(src), Path(out)
    splits = _check_splits(splits)
    if maxcount < 1 or maxsize < 1:
        raise ShardError(f"maxcount and maxsize must be positive, got {maxcount} and {maxsize}")
    present = [s for s in splits if (src / s).is_dir()]
    if not present:
        raise ShardError(f"'{src}' has none of the split folders {', '.join(splits)} (the reference layout)")
    if out.exists() and not out.is_dir():
        raise ShardError(f"output '{out}' exists and is not a folder")

    # Refuse to mix with an earlier output unless asked; then remove what this run replaces, manifest first,
    # so an interrupted overwrite never looks complete.
    previous = None
    if out.is_dir() and ((out / MANIFEST).exists() or any(out.rglob("*.tar"))):
        if not overwrite:
            raise ShardError(f"output folder '{out}' already holds shards or a {MANIFEST}; "
                             "pass --overwrite (overwrite=True) to replace them")
        previous = _previous_manifest(out) if (out / MANIFEST).exists() else None
        (out / MANIFEST).unlink(missing_ok=True)
        for split in present:
            for old in _shard_files(out / split, split):
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)

    # Shard each split.
    entries: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    for split in splits:
        if split not in present:
            log.info("no folder %s: split %s not written", src / split, split)
            continue
        entries[split] = _write_split(src / split, out / split, split, maxcount, maxsize, skipped)

    # Keep the previous manifest's entries of splits this run did not touch, where their shards are intact.
    if previous is not None:
        for split, entry in previous.get("splits", {}).items():
            if split in entries:
                continue
            if all((out / s["path"]).is_file() and (out / s["path"]).stat().st_size == s["bytes"]
                   for s in entry.get("shards", [])):
                entries[split] = entry
                skipped.extend(s for s in previous.get("skipped", []) if s.get("split") == split)
            else:
                log.warning("dropping split %s from the manifest: its earlier shards changed", split)
    order = {s: i for i, s in enumerate(SPLITS)}
    manifest = {
        "version": VERSION,
        "source": str(src.resolve()),
        "splits": {s: entries[s] for s in sorted(entries, key=lambda s: (order.get(s, len(order)), s))},
        "skipped": skipped,
    }

    # The manifest goes last, atomically: its presence marks a complete output.
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out / MANIFEST)
    _fsync_dir(out)
    return manifest


def load_manifest(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a shard folder written by `write_shards`.

    Raises:
        ShardError: no manifest (the output is missing or incomplete), or an unknown manifest version.
    """
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise ShardError(f"'{path}' does not exist: the output is incomplete or not made by pipeline.shards")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("version") != VERSION:
        raise ShardError(f"'{path}' has version {manifest.get('version')!r}; this code reads {VERSION}")
    return manifest


def split_pattern(out: str | os.PathLike[str], split: str) -> str:
    """Absolute brace pattern of one split's shards (for data.train_a and friends, or wds.WebDataset).

    Raises:
        ShardError: no manifest, or the split has no shards.
    """
    entry = load_manifest(out)["splits"].get(split)
    if not entry or not entry["pattern"]:
        raise ShardError(f"'{out}' has no shards for split {split}")
    return str(Path(out).resolve() / entry["pattern"])


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit code (2 for usage errors and an existing output)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.shards", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="folder with trainA/ trainB/ testA/ testB/")
    parser.add_argument("out", type=Path, help="output folder for the shards and manifest.json")
    parser.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard at most")
    parser.add_argument("--maxsize", type=int, default=DEFAULT_MAXSIZE, help="bytes per shard at most (1 GB)")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated split folders")
    parser.add_argument("--overwrite", action="store_true", help="replace shards and manifest already in OUT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        manifest = write_shards(args.src, args.out, splits, args.maxcount, args.maxsize, args.overwrite)
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split in splits:
        entry = manifest["splits"].get(split)
        if not (args.src / split).is_dir():
            kept = " (shards of an earlier run kept)" if entry else ""
            print(f"{split}: no folder {args.src / split}, not written{kept}")
            continue
        size = sum(s["bytes"] for s in entry["shards"])
        bad = sum(s["split"] == split for s in manifest["skipped"])
        where = args.out / entry["pattern"] if entry["pattern"] else "no shards"
        print(f"{split}: {entry['count']} images, {bad} skipped, {len(entry['shards'])} shard(s), "
              f"{size / 1e6:.1f} MB -> {where}")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable file(s): listed in {args.out / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
