"""Writing image folders as WebDataset tar shards plus a manifest (the `pipeline.shards` command's library).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import shlex
import signal
import subprocess
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from pipeline.data.pixels import png_bit_depth, read_native
from pipeline.data.skips import WIDE_MODES
from pipeline.engine.progress import Progress

log = logging.getLogger(__name__)

SPLITS = ("trainA", "trainB", "testA", "testB")
EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".tif": "tif", ".tiff": "tif",
              ".npy": "npy"}
NATIVE_ONLY = {"tif", "npy"}  # Members only the native decoder reads (pipeline.data.pixels): stored as they are.
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> member extension.
FORMAT_NAMES = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP"}  # --format -> PIL format.
MANIFEST = "manifest.json"
VERSION = 1
DEFAULT_MAXCOUNT = 1000
DEFAULT_MAXSIZE = 10**9
DEFAULT_QUALITY = 95
# Folders are usually grouped (by source photo, video, class): sorted order would give each shard a narrow slice
# that the loader's buffer cannot mix, so files are shuffled by default, with a fixed seed the manifest records.
DEFAULT_SHUFFLE_SEED = 0
PIPE = "pipe:"
TAR_FORMAT = tarfile.PAX_FORMAT  # Long and non-ASCII names; deterministic for fixed metadata.
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ShardError(RuntimeError):
    """The output cannot be written (or read) as asked; the message says what to do."""


class PipeCommandError(ShardError):
    """A `pipe:` output command failed or stopped reading: the shard it was sent is not complete."""


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


def verify_image(data: bytes) -> tuple[str | None, tuple[int, int]]:
    """Decode `data` fully, as training does (raises if it is not a readable image).

    Returns its member extension (None for a format shards do not store as is) and its (width, height).
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img.convert("RGB")  # Palette and CMYK files must convert too; training calls this.
        return FORMATS.get(img.format or ""), img.size


def error_reason(err: Exception) -> str:
    """One line for an error (an image that cannot be read, mostly): its type and message."""
    text = str(err)
    if "BytesIO" in text:  # PIL names the BytesIO object: an address, different on every run.
        what = "not an image format PIL can read" if isinstance(err, UnidentifiedImageError) else "not a readable image"
        return f"{type(err).__name__}: {what}"
    return f"{type(err).__name__}: {text}"


# --- Encoding (runs in the worker processes) ---------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """What happens to an image's bytes at shard time."""

    resize: int | None = None
    """Side of the square the image is resized to (bicubic); None keeps its size."""
    format: str | None = None
    """PIL format to re-encode to (JPEG, PNG, WEBP); None keeps the source's format."""
    quality: int = DEFAULT_QUALITY
    """JPEG/WebP quality of re-encoded images."""

    @property
    def reencodes(self) -> bool:
        return self.resize is not None or self.format is not None

    def manifest_options(self, shuffle_seed: int | None, maxcount: int = DEFAULT_MAXCOUNT,
                         maxsize: int = DEFAULT_MAXSIZE) -> dict[str, Any]:
        """The settings that decide the shards' bytes, as recorded in the manifest."""
        return {"resize": self.resize, "format": self.format.lower() if self.format else None,
                "quality": self.quality if self.reencodes else None, "shuffle_seed": shuffle_seed,
                "maxcount": maxcount, "maxsize": maxsize}


def _sample_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that decide each sample's bytes and the order, not where shards are cut: splits that differ
    only in maxcount or maxsize can share an output."""
    return {k: v for k, v in options.items() if k not in ("maxcount", "maxsize")}


def _encode(path: str, encoding: Encoding) -> tuple[str, bytes]:
    """Read, verify and (if asked) resize and re-encode one image; returns its member extension and bytes."""
    data = Path(path).read_bytes()
    ext = EXTENSIONS[Path(path).suffix.lower()]
    if ext in NATIVE_ONLY or _is_wide(data):
        read_native(data, ext)  # Verifies it as training reads it.
        if encoding.reencodes:
            raise ValueError("--resize/--format re-encode as 8-bit RGB, which would clip or drop this image's "
                             "values (16-bit, float or multi-band): shard the set without them")
        return ext, data
    if not encoding.reencodes:
        return verify_image(data)[0] or ext, data
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        source = img.format or ""
        rgb = img.convert("RGB")
    target = encoding.format or (source if source in FORMATS else "PNG")
    side = encoding.resize
    if (side is None or rgb.size == (side, side)) and target == source:
        return FORMATS[source], data  # Already as asked: re-encoding a JPEG would only lose quality.
    if side is not None and rgb.size != (side, side):
        rgb = rgb.resize((side, side), Image.BICUBIC)
    out = io.BytesIO()
    if target == "PNG":
        rgb.save(out, "PNG")
    else:
        rgb.save(out, target, quality=encoding.quality)
    return FORMATS[target], out.getvalue()


def _is_wide(data: bytes) -> bool:
    """A PNG of 16 bits per sample (Pillow reads colour ones as 8 bits), or an image PIL opens as 16/32-bit."""
    if png_bit_depth(data) == 16:
        return True
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode in WIDE_MODES
    except Exception:  # noqa: BLE001 - not an image: verify_image says so
        return False


def _encode_chunk(tasks: list[tuple[str, Encoding]]) -> list[tuple[bool, str, bytes | None]]:
    """Worker entry: (True, extension, bytes) per readable image, (False, reason, None) per unreadable one."""
    results: list[tuple[bool, str, bytes | None]] = []
    for path, encoding in tasks:
        try:
            ext, data = _encode(path, encoding)
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...).
            results.append((False, error_reason(err), None))
        else:
            results.append((True, ext, data))
    return results


def process_pool(workers: int) -> ProcessPoolExecutor | None:
    """A pool of `workers` processes, or None for 1 (work in this process).

    Workers start by forkserver, not fork: the caller may hold threads (a training process, a test runner with
    torch loaded). Like any multiprocessing code, a script calling this needs an `if __name__ == "__main__":`
    guard.
    """
    if workers <= 1:
        return None
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def _ordered_results(tasks: list[tuple[str, Encoding]], pool: ProcessPoolExecutor | None,
                     workers: int) -> Iterator[tuple[bool, str, bytes | None]]:
    """Results of `_encode_chunk` over `tasks` in input order.

    In this process when there is no pool (lazily: an interruption leaves nothing done ahead). Otherwise in
    chunks, with at most 2 x workers + 2 chunks in flight, so memory stays bounded when writing is slower
    than encoding (a slow upload).
    """
    if pool is None:
        for task in tasks:
            yield from _encode_chunk([task])
        return
    chunksize = max(1, min(8, len(tasks) // (workers * 16)))
    chunks = (tasks[i : i + chunksize] for i in range(0, len(tasks), chunksize))
    pending: deque[Future] = deque()
    for chunk in chunks:
        pending.append(pool.submit(_encode_chunk, chunk))
        if len(pending) >= 2 * workers + 2:
            break
    while pending:
        results = pending.popleft().result()
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append(pool.submit(_encode_chunk, chunk))
        yield from results


# --- Outputs: a local folder or a pipe: command ----------------------------------------------------------------


class _Upload:
    """One file being written: bytes go to `raw` and through sha256; tarfile needs write() and tell()."""

    def __init__(self, relative: str) -> None:
        self.relative = relative
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """Make the file complete and visible (rename, or the command's successful exit)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop the file: nothing of it may look complete."""
        raise NotImplementedError


class _LocalUpload(_Upload):
    def __init__(self, folder: Path, relative: str) -> None:
        super().__init__(relative)
        self.path = folder / relative
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created with open(), not mkstemp, so the file gets the umask's mode rather than 0o600.
        self.tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.tmp"
        self.file = open(self.tmp, "wb")

    def _write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)  # The rename too survives a crash.

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class _PipeUpload(_Upload):
    def __init__(self, template: str, relative: str) -> None:
        super().__init__(relative)
        self.command = template.replace("{path}", shlex.quote(relative))
        # A session (and process group) of its own: abort() can kill every process the command starts.
        self.proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.PIPE, start_new_session=True)

    def _stopped_reading(self) -> PipeCommandError:
        code = self.proc.wait()
        return PipeCommandError(f"the pipe command for {self.relative} exited (code {code}) before reading all of "
                                f"its input: {self.command}")

    def _write(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError:
            raise self._stopped_reading() from None

    def commit(self) -> None:
        try:
            self.proc.stdin.close()  # Flushes the last bytes: the command may have gone by then.
        except BrokenPipeError:
            raise self._stopped_reading() from None
        code = self.proc.wait()
        if code != 0:
            raise PipeCommandError(f"the pipe command for {self.relative} exited with code {code}: {self.command}")

    def abort(self) -> None:
        # Every process of the command dies before its input ends: one that saw end of input would take the
        # truncated file as complete (`aws s3 cp -` finishes the upload; `cat > f && mv f dest` renames it).
        # Only while the shell is not reaped: until then its pid, the group's id, cannot name another group.
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # The whole group has exited already.
                pass
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


class _Output:
    """Where shards go: a local folder, or a `pipe:` command run once per file."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        text = os.fspath(out)
        self.template = text[len(PIPE) :] if text.startswith(PIPE) else None
        self.folder = None if self.template is not None else Path(text)
        if self.template is not None and "{path}" not in self.template:
            raise ShardError(f"the output command '{text}' has no {{path}}: every shard would go to the same place "
                             "(e.g. pipe:aws s3 cp - s3://bucket/set/{path})")

    def open(self, relative: str) -> _Upload:
        if self.template is not None:
            return _PipeUpload(self.template, relative)
        return _LocalUpload(self.folder, relative)

    def describe(self, relative: str) -> str:
        if self.template is not None:
            return self.template.replace("{path}", relative)
        return str(self.folder / relative)


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
    """Writes the numbered shards of one split, each through a temporary file (or command) committed when complete.

    A shard closes before a sample that would take it past `maxcount` samples or `maxsize` bytes (its exact
    final size, record padding included); a sample larger than `maxsize` gets a shard of its own.
    """

    def __init__(self, output: _Output, split: str, maxcount: int, maxsize: int) -> None:
        self.output, self.split = output, split
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shards: list[dict[str, Any]] = []
        self._upload: _Upload | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._member_bytes = 0

    def _open(self) -> None:
        relative = f"{self.split}/{self.split}-{len(self.shards):06d}.tar"
        self._upload = self.output.open(relative)
        self._tar = tarfile.open(fileobj=self._upload, mode="w", format=TAR_FORMAT, encoding="utf-8")
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
        """Finish the open shard (if any): end the tar, commit the file, record it."""
        if self._tar is None:
            return
        self._tar.close()
        upload = self._upload
        upload.commit()
        self.shards.append({"path": upload.relative, "count": self._count, "bytes": upload.size,
                            "sha256": upload.digest.hexdigest()})
        log.info("wrote %s (%d samples, %.1f MB)", self.output.describe(upload.relative), self._count,
                 upload.size / 1e6)
        self._tar = self._upload = None

    def abort(self) -> None:
        """Drop the open shard; shards already committed stay (the manifest is not written)."""
        if self._upload is not None:
            self._upload.abort()
        self._tar = self._upload = None


def _shard_files(folder: Path, split: str) -> list[Path]:
    """Shards of `split` in `folder` and temporary files left by an interrupted run."""
    names = re.compile(rf"{re.escape(split)}-\d{{6,}}\.tar|\.{re.escape(split)}-\d{{6,}}\.tar\.\d+\.tmp")
    return sorted(p for p in folder.glob("*") if names.fullmatch(p.name)) if folder.is_dir() else []


@dataclass
class _Entry:
    path: Path
    relative: str
    name: bytes | None  # None: the file name is not valid UTF-8.
    key: str = ""


def _list_split(folder: Path, shuffle_seed: int | None, split: str) -> list[_Entry]:
    """The split's files in the order they are written, each with its unique key.

    Keys are given in sorted order, before any shuffle, so they do not depend on the seed.
    """
    entries = []
    for path in list_images(folder):
        relative = path.relative_to(folder).as_posix()
        try:
            name = relative.encode("utf-8")
        except UnicodeEncodeError:
            name = None
        entries.append(_Entry(path, relative, name))
    used: set[str] = set()
    for entry in entries:
        if entry.name is None:
            continue
        key = base = sample_key(entry.relative)
        suffix = 1
        while key in used:  # a.png and a.jpg, or a.b.png and a_b.png, would share a key.
            key, suffix = f"{base}_{suffix}", suffix + 1
        if key != base:
            log.warning("key %s of %s is taken; using %s", base, entry.path, key)
        used.add(key)
        entry.key = key
    if shuffle_seed is not None:
        random.Random(f"{shuffle_seed}:{split}").shuffle(entries)
    return entries


def _write_split(entries: list[_Entry], folder: Path, output: _Output, split: str, maxcount: int, maxsize: int,
                 encoding: Encoding, pool: ProcessPoolExecutor | None, workers: int, progress: Progress,
                 skipped: list[dict[str, str]]) -> dict[str, Any]:
    """Shard one split's files; unreadable files are appended to `skipped`."""
    if output.folder is not None:
        dest = output.folder / split
        dest.mkdir(parents=True, exist_ok=True)
        for stale in _shard_files(dest, split):
            if stale.suffix == ".tmp":
                stale.unlink()
    writer = _ShardWriter(output, split, maxcount, maxsize)
    results = _ordered_results([(str(e.path), encoding) for e in entries if e.name is not None], pool, workers)
    count = 0
    try:
        for entry in entries:
            progress.update(label=f"sharding {split}")
            if entry.name is None:
                ok, reason, data = False, "file name is not valid UTF-8", None
            else:
                ok, reason, data = next(results)
            if not ok:
                log.warning("skipping unreadable image %s (%s)", entry.path, reason)
                skipped.append({"split": split, "path": f"{split}/{entry.relative}", "reason": reason})
                continue
            writer.add([(f"{entry.key}.{reason}", data), (f"{entry.key}.name.txt", entry.name)])
            count += 1
        writer.close()
    except BaseException:
        writer.abort()
        results.close()
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


def make_encoding(resize: int | None = None, format: str | None = None, quality: int = DEFAULT_QUALITY) -> Encoding:
    """Check and normalise the shard-time encoding options.

    Args:
        resize: side of the square images are resized to, or None.
        format: jpeg (or jpg), png, webp, or None to keep each image's format.
        quality: JPEG/WebP quality, 1-100.

    Raises:
        ShardError: a value out of range or an unknown format.
    """
    if resize is not None and resize < 1:
        raise ShardError(f"resize must be a positive side in pixels, got {resize}")
    if not 1 <= quality <= 100:
        raise ShardError(f"quality must lie in 1..100, got {quality}")
    name = None
    if format is not None:
        name = FORMAT_NAMES.get(format.lower())
        if name is None:
            raise ShardError(f"unknown format '{format}'; choose one of: jpeg, png, webp")
    return Encoding(resize, name, quality)


def _write_manifest(output: _Output, manifest: dict[str, Any]) -> None:
    """The manifest goes last: its presence marks a complete output (atomically, locally)."""
    text = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    upload = output.open(MANIFEST)
    try:
        upload.write(text)
        upload.commit()
    except BaseException:
        upload.abort()
        raise


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


def write_shards(src: str | os.PathLike[str], out: str | os.PathLike[str], splits: Sequence[str] = SPLITS,
                 maxcount: int = DEFAULT_MAXCOUNT, maxsize: int = DEFAULT_MAXSIZE, overwrite: bool = False,
                 workers: int = 1, resize: int | None = None, format: str | None = None,
                 quality: int = DEFAULT_QUALITY, shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
                 progress: bool = False) -> dict[str, Any]:
    """Shard the reference layout under `src` into `out`; returns the manifest (also written to the output).

    Args:
        src: folder holding some of the split folders (trainA/, trainB/, testA/, testB/).
        out: output folder (created if missing), or `pipe:COMMAND` with `{path}` in COMMAND: each shard and
            finally manifest.json is streamed to the command's standard input.
        splits: split folders to shard; those missing under `src` are left out (at least one must exist).
        maxcount: samples per shard at most.
        maxsize: bytes per shard at most (a single larger sample still gets a shard of its own).
        overwrite: allow a local `out` that already holds a manifest or tars. The shards of the splits written
            are removed first; other splits' entries in the previous manifest are kept if their files are
            intact and were written with the same encoding options and shuffle seed (they keep the shards they
            were cut into; the manifest's maxcount and maxsize are this run's).
        workers: processes that read, verify and encode images (1: this process). The output does not
            depend on it.
        resize: resize every image to resize x resize (bicubic) before storing it.
        format: re-encode every image as jpeg, png or webp (None: keep the source format).
        quality: JPEG/WebP quality of re-encoded images.
        shuffle_seed: write each split's files in a random order drawn from this seed (default 0; None: sorted
            order). The output is byte-identical for a seed.
        progress: report files/s and ETA on stderr.

    Raises:
        ShardError: bad arguments, no split folder under `src`, `out` holds shards or a manifest and
            `overwrite` is False.
        PipeCommandError: a pipe command failed or exited before reading all its input.
    """
    src = Path(src)
    output = _Output(out)
    splits = _check_splits(splits)
    encoding = make_encoding(resize, format, quality)
    if maxcount < 1 or maxsize < 1:
        raise ShardError(f"maxcount and maxsize must be positive, got {maxcount} and {maxsize}")
    if workers < 1:
        raise ShardError(f"workers must be at least 1, got {workers}")
    present = [s for s in splits if (src / s).is_dir()]
    if not present:
        raise ShardError(f"'{src}' has none of the split folders {', '.join(splits)} (the reference layout)")
    options = encoding.manifest_options(shuffle_seed, maxcount, maxsize)
    folder = output.folder
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ShardError(f"output '{folder}' exists and is not a folder")

    # Refuse to mix with an earlier output unless asked; then remove what this run replaces, manifest first,
    # so an interrupted overwrite never looks complete. (A pipe: output cannot be listed: it is the command's.)
    previous = None
    if folder is not None and folder.is_dir() and ((folder / MANIFEST).exists() or any(folder.rglob("*.tar"))):
        if not overwrite:
            raise ShardError(f"output folder '{folder}' already holds shards or a {MANIFEST}; "
                             "pass --overwrite (overwrite=True) to replace them")
        previous = _previous_manifest(folder) if (folder / MANIFEST).exists() else None
        kept = [s for s in (previous or {}).get("splits", {}) if s not in present]
        before = (previous or {}).get("options", Encoding().manifest_options(None))
        if kept and _sample_options(before) != _sample_options(options):
            raise ShardError(f"'{folder}' keeps split(s) {', '.join(kept)} written with {before}, and this run "
                             f"uses {options}: shard those splits too (--splits) or write to a new folder")
        (folder / MANIFEST).unlink(missing_ok=True)
        for split in present:
            for old in _shard_files(folder / split, split):
                old.unlink()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    # List every split first: the progress total, and the deterministic order (sorted, or seeded shuffle).
    listed = {split: _list_split(src / split, shuffle_seed, split) for split in present}
    meter = Progress(sum(len(e) for e in listed.values()), enabled=progress)

    # Shard each split.
    entries: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    pool = process_pool(workers)
    try:
        for split in splits:
            if split not in present:
                log.info("no folder %s: split %s not written", src / split, split)
                continue
            entries[split] = _write_split(listed[split], src / split, output, split, maxcount, maxsize, encoding,
                                          pool, workers, meter, skipped)
    finally:
        meter.close()  # Ends the progress line, so an error message starts on a line of its own.
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # Keep the previous manifest's entries of splits this run did not touch, where their shards are intact.
    if previous is not None:
        for split, entry in previous.get("splits", {}).items():
            if split in entries:
                continue
            if all((folder / s["path"]).is_file() and (folder / s["path"]).stat().st_size == s["bytes"]
                   for s in entry.get("shards", [])):
                entries[split] = entry
                skipped.extend(s for s in previous.get("skipped", []) if s.get("split") == split)
            else:
                log.warning("dropping split %s from the manifest: its earlier shards changed", split)
    order = {s: i for i, s in enumerate(SPLITS)}
    manifest = {
        "version": VERSION,
        "source": str(src.resolve()),
        "options": options,
        "splits": {s: entries[s] for s in sorted(entries, key=lambda s: (order.get(s, len(order)), s))},
        "skipped": skipped,
    }
    _write_manifest(output, manifest)
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
