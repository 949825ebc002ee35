"""Download, verify and shard the standard CycleGAN datasets (the reference implementation's unpaired sets).

    python datasets/cyclegan_sets.py horse2zebra [more names | all] [--base-url URL] [--root data]
        [--workers N] [--resize 286] [--format jpeg] [--quality 95] [--shuffle-seed S | --no-shuffle] [--maxcount N]
        [--retries 3] [--timeout 60] [--keep-zip] [--force]

For each set, in <root>/<name>/:
1. <base-url>/<name>.zip is downloaded to <name>.zip.part. An interrupted download resumes with an HTTP Range
   request (If-Range, with a strong ETag or else Last-Modified, guards against a file that changed meanwhile); a
   server that answers 200 instead of 206, or a Content-Range that is unusable, does not start where the .part
   ends or names another length than before, restarts it from zero. A .part that holds every byte announced is
   verified without downloading anything. The file is renamed to <name>.zip only when its length equals the
   length the server announced (a server that announces none: when it ends as a zip) and every member's CRC
   checks (zipfile.testzip). A base URL that is a local folder (or file:) is read in place, without copying. A
   <name>.zip already in <root>/<name>/ (yours, or kept by an earlier run) is verified and used; only a zip this
   run downloaded is removed after extraction (unless --keep-zip).
2. The zip is extracted to a temporary folder (removed if anything fails), checked for the reference layout
   (<name>/trainA, trainB and usually testA, testB; image counts reported and compared with the reference's
   where known) and renamed to images/.
3. images/ is sharded with pipeline.shards (all its options: --workers, --resize, --format, --quality,
   --shuffle-seed, --maxcount) into shards/; shards/manifest.json, written last, marks the set complete and
   records the options.
4. train.yaml is written: configs/<name>.yaml with these shards' absolute paths and train.steps = 200 epochs of
   the larger training domain as counted, so `python -m pipeline.train --config <root>/<name>/train.yaml` trains
   wherever the shards are. With --root data, run from the repository, configs/<name>.yaml works as it is.

Each stage's output appears only when complete, so running the same command again finishes an interrupted set
(a half-written .part resumes; a temporary extraction or shards without a manifest are redone) and does nothing
for a finished one, unless the shard options changed or --force is given.

cityscapes is not offered by the reference's download script (its license forbids redistribution): build its
layout with the reference's datasets/prepare_cityscapes_dataset.py from the official files, then put it at
<root>/cityscapes/images (or a cityscapes.zip at <root>/cityscapes/cityscapes.zip) and run this script.
"""

from __future__ import annotations

import argparse
import difflib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # A script, not a package: find pipeline/ from anywhere.

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data.shards import (  # noqa: E402
    DEFAULT_MAXCOUNT,
    DEFAULT_MAXSIZE,
    DEFAULT_QUALITY,
    DEFAULT_SHUFFLE_SEED,
    MANIFEST,
    SPLITS,
    ShardError,
    list_images,
    make_encoding,
    split_pattern,
    write_shards,
)
from pipeline.engine.progress import Progress  # noqa: E402

log = logging.getLogger("cyclegan_sets")

DEFAULT_BASE_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
NAMES = ("apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo", "cezanne2photo", "ukiyoe2photo",
         "vangogh2photo", "maps", "cityscapes", "facades", "iphone2dslr_flower")
# Training images (trainA, trainB) where they are known: the paper's and reference's figures for these zips
# (also in configs/). Other sets are counted and reported, not compared.
EXPECTED_TRAIN = {
    "horse2zebra": (1067, 1334),
    "summer2winter_yosemite": (1231, 962),
    "monet2photo": (1072, 6287),
    "cityscapes": (2975, 2975),
    "maps": (1096, 1096),
    "facades": (400, 400),
}
EPOCHS = 200  # The paper: 100 epochs at constant lr, 100 decaying, at batch 1.
CHUNK = 1 << 20
USER_AGENT = "cyclegan-pipeline-recipe/1 (python urllib)"
CITYSCAPES_HELP = (
    "the reference's download script does not offer cityscapes (its license forbids redistribution). Download "
    "gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com, build the "
    "layout with the reference's datasets/prepare_cityscapes_dataset.py, then put the folder (trainA, trainB, "
    "testA, testB) at {images} or its zip at {zip}, or serve it with --base-url, and run this again"
)


class RecipeError(RuntimeError):
    """A set cannot be prepared; the message names the URL or file and what to do."""


class _Incomplete(RuntimeError):
    """A download stopped early; the .part keeps what arrived (retry resumes)."""


class _Restart(RuntimeError):
    """The .part cannot be resumed and was removed: download from zero."""


def resolve_names(names: list[str]) -> list[str]:
    """Set names from the command line ('all' for every set), in order, without repeats.

    Raises:
        RecipeError: an unknown name, with the closest known one.
    """
    out: list[str] = []
    for name in names:
        chosen = list(NAMES) if name == "all" else [name]
        for item in chosen:
            if item not in NAMES:
                near = difflib.get_close_matches(item, NAMES, n=1, cutoff=0.5)
                hint = f"did you mean '{near[0]}'? " if near else ""
                raise RecipeError(f"unknown dataset '{item}'; {hint}known sets: {', '.join(NAMES)} (or 'all')")
            if item not in out:
                out.append(item)
    return out


def _local_base(base_url: str) -> Path | None:
    """The folder a base URL names when it is local (a path or file:), else None."""
    parsed = urllib.parse.urlparse(base_url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(base_url) if parsed.scheme == "" else None


def zip_url(base_url: str, name: str) -> str:
    """Where a set's zip lives: <base>/<name>.zip."""
    return f"{base_url.rstrip('/')}/{name}.zip"


# --- Download ----------------------------------------------------------------------------------------------------


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(start, total) of a 'bytes START-END/TOTAL' header (total None for '*'); None if it is not one."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        return None
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _unsatisfied_total(value: str | None) -> int | None:
    """TOTAL of the 'bytes */TOTAL' header of a 416 answer; None if absent or unusable."""
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value or "")
    return int(match.group(1)) if match else None


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict[str, Any]:
    """What the response that started `part` said (url, total, etag, last_modified); {} if unknown."""
    try:
        meta = json.loads(_meta_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # Missing or damaged: resume without validators.
        return {}
    return meta if isinstance(meta, dict) else {}


def _write_meta(part: Path, meta: dict[str, Any]) -> None:
    path = _meta_path(part)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp, path)  # Never half-written.


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def _if_range(meta: dict[str, Any]) -> str | None:
    """The validator to send in If-Range: a strong ETag, else Last-Modified (a weak ETag never matches)."""
    etag = meta.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return meta.get("last_modified")


def _fetch(url: str, part: Path, timeout: float, say: Any, progress: bool) -> None:
    """One request: resume `part` if it has bytes (and the server agrees), else download from zero.

    Returns without a request when `part` already holds every byte the server announced.

    Raises:
        _Incomplete: the response ended before its announced length, or without a length before the end of a
            zip (the bytes that came are kept).
        _Restart: `part` cannot be resumed (another file on the server, an unusable answer); it was removed.
        RecipeError: an HTTP error that retrying cannot fix (404 and the like).
    """
    have = part.stat().st_size if part.exists() else 0
    meta = _read_meta(part) if have else {}
    known = meta.get("total")
    if have and known == have:
        say(f"  {part.name} holds all {have:,} bytes already")
        return
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = _if_range(meta)
        if validator:
            headers["If-Range"] = validator  # A changed file comes back whole (200), not as a bad splice.
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        try:
            if err.code == 416 and have:  # Range not satisfiable: the .part is complete, or not this file's.
                total = _unsatisfied_total(err.headers.get("Content-Range"))
                if total == have:
                    say(f"  {part.name} holds all {have:,} bytes already (HTTP 416 names that length)")
                    return
                say(f"  {url}: the server cannot resume at byte {have:,} (HTTP 416); starting over")
                _discard(part)
                raise _Restart from None
            if err.code in (408, 429) or err.code >= 500:
                raise _Incomplete(f"HTTP {err.code} {err.reason}") from None
            raise RecipeError(f"{url} answered HTTP {err.code} {err.reason}; check --base-url and the set name") \
                from None
        finally:
            err.close()
    with response:
        if have and response.status == 206:
            parsed = _content_range(response.headers.get("Content-Range"))
            if parsed is None:
                restart = f"its Content-Range {response.headers.get('Content-Range')!r} is unusable"
            elif parsed[0] != have:
                restart = f"the server resumed at byte {parsed[0]:,}, not {have:,}"
            elif known is not None and parsed[1] is not None and parsed[1] != known:
                restart = f"the file on the server changed ({parsed[1]:,} bytes now, {known:,} before)"
            else:
                restart = None
            if restart:
                say(f"  {url}: {restart}; starting over")
                _discard(part)
                raise _Restart
            mode, total = "ab", parsed[1] if parsed[1] is not None else known
            say(f"  resuming {url} at byte {have:,}" + (f" of {total:,}" if total else ""))
        else:
            if have:
                say(f"  {url}: the server sent the whole file (HTTP {response.status}, not 206); starting over")
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        _write_meta(part, {"url": url, "total": total, "etag": response.headers.get("ETag"),
                           "last_modified": response.headers.get("Last-Modified")})
        meter = Progress(total - have if total is not None else None, unit="bytes", enabled=progress)
        meter.label = f"  {part.name[: -len('.part')]}" + (f" (from byte {have:,})" if have else "")
        with open(part, mode) as handle:
            try:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    handle.write(block)
                    meter.update(len(block))
            except (OSError, http.client.HTTPException) as err:
                raise _Incomplete(f"{type(err).__name__}: {err}") from None
            finally:
                handle.flush()
                os.fsync(handle.fileno())
                meter.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Incomplete(f"the connection closed after {size:,} of {total:,} bytes")
    if total is None:
        if not zipfile.is_zipfile(part):  # No end of a zip yet: most likely cut short, so keep it to resume.
            raise _Incomplete(f"the server announced no length and the {size:,} bytes so far do not end a zip")
        say(f"  {url}: the server announced no length; relying on the zip's own checks")


def verify_zip(path: Path, source: str) -> int:
    """Check that `path` is a zip whose every member's CRC matches; returns the number of members.

    Raises:
        RecipeError: not a zip, or a member fails its CRC (naming it).
    """
    if not zipfile.is_zipfile(path):
        raise RecipeError(f"{source} is not a zip file (an HTML error page or a truncated file?)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            count = len(archive.infolist())
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise RecipeError(f"{source} is a damaged zip: {err}") from None
    if bad is not None:
        raise RecipeError(f"{source}: member {bad} fails its CRC check (the download is corrupt)")
    return count


def download(url: str, dest: Path, retries: int = 3, timeout: float = 60.0, retry_wait_s: float = 2.0,
             progress: bool = True, say: Any = print) -> Path:
    """Download `url` to `dest` through `dest`.part with resume; `dest` appears only complete and verified.

    Args:
        url: http(s) URL of a zip.
        dest: final path of the zip.
        retries: further attempts after an interrupted one (each resumes where the last stopped).
        timeout: seconds a connection may stay silent.
        retry_wait_s: wait before the first retry; doubles each time (at most 60 s).
        progress: show MB, MB/s and ETA on stderr.
        say: where progress lines go.

    Raises:
        RecipeError: the download failed after all retries (the .part is kept for the next run), the server
            refused it, or the result is not an intact zip (then the .part is removed: the next run starts over).
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"  downloading {url}")
    wait, attempt, restarts = retry_wait_s, 0, 0
    while True:
        try:
            _fetch(url, part, timeout, say, progress)
            break
        except _Restart:
            restarts += 1  # Does not use up a retry: nothing was lost but the unusable .part.
            if restarts > 2:
                raise RecipeError(f"{url} cannot be resumed and keeps failing from zero; check --base-url") from None
            continue
        except _Incomplete as err:
            kept = part.stat().st_size if part.exists() else 0
            if attempt >= retries:
                raise RecipeError(f"download of {url} failed after {attempt + 1} attempt(s): {err}; {kept:,} bytes "
                                  f"are kept in {part}: run the same command again to resume") from None
            say(f"  {url}: {err}; retrying in {wait:g} s (resuming from byte {kept:,})")
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            if attempt >= retries:
                raise RecipeError(f"cannot download {url}: {reason}; check the network and --base-url, then run "
                                  "again (a partial download resumes)") from None
            say(f"  {url}: {reason}; retrying in {wait:g} s")
        attempt += 1
        time.sleep(wait)
        wait = min(wait * 2, 60.0)
    try:
        members = verify_zip(part, f"the download of {url} ({part})")
    except RecipeError as err:
        _discard(part)
        raise RecipeError(f"{err}; it was removed: run again to download it afresh") from None
    os.replace(part, dest)
    _meta_path(part).unlink(missing_ok=True)
    say(f"  verified {dest.name}: {dest.stat().st_size:,} bytes, {members} members, CRCs ok")
    return dest


# --- Extract and check the layout -------------------------------------------------------------------------------


def _safe_members(archive: zipfile.ZipFile, source: str) -> None:
    for info in archive.infolist():
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise RecipeError(f"{source} holds an unsafe member path '{info.filename}'; refusing to extract it")


def count_layout(folder: Path, source: str) -> tuple[dict[str, int], list[str]]:
    """Images per split folder of the reference layout, and other folders found (not sharded).

    Raises:
        RecipeError: trainA or trainB is missing or holds no image.
    """
    counts = {split: len(list_images(folder / split)) for split in SPLITS if (folder / split).is_dir()}
    missing = [s for s in ("trainA", "trainB") if not counts.get(s)]
    if missing:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        raise RecipeError(f"{source} is not in the reference layout: {', '.join(missing)} missing or without images "
                          f"(found folders: {', '.join(found) or 'none'})")
    extras = sorted(p.name for p in folder.iterdir()
                    if p.is_dir() and p.name not in SPLITS and not p.name.startswith((".", "__")))
    return counts, extras


def extract(zip_path: Path, set_dir: Path, name: str, say: Any = print) -> tuple[dict[str, int], list[str]]:
    """Unpack a set's zip into set_dir/images (the folder holding trainA ...), through a temporary folder.

    Returns `count_layout` of images/. Nothing extracted is left behind when this fails.

    Raises:
        RecipeError: a damaged zip, unsafe member paths, or not the reference layout.
    """
    images, tmp = set_dir / "images", set_dir / ".images.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # Left by an interrupted extraction.
    say(f"  extracting {zip_path.name}")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            _safe_members(archive, str(zip_path))
            archive.extractall(tmp)
        top = tmp / name if (tmp / name).is_dir() else tmp
        layout = count_layout(top, str(zip_path))
        os.replace(top, images)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (zipfile.BadZipFile, zlib.error, EOFError)):  # A CRC or format error while unpacking.
            raise RecipeError(f"{zip_path} is a damaged zip: {err}") from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # What the zip held beside <name>/ (__MACOSX/).
    return layout


# --- The recipe --------------------------------------------------------------------------------------------------


@dataclass
class SetResult:
    """What `prepare` did for one set."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    expected: tuple[int, int] | None = None
    extras: list[str] = field(default_factory=list)
    shards: Path | None = None
    train_config: Path | None = None
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    already_complete: bool = False


def _complete_manifest(shards: Path, options: dict[str, Any]) -> dict[str, Any] | None:
    path = shards / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return manifest if manifest.get("options", {}) == options else None


def write_train_config(name: str, set_dir: Path, shards: Path, counts: dict[str, int],
                       resize: int | None = None) -> tuple[Path, list[str]]:
    """Write set_dir/train.yaml: configs/<name>.yaml with absolute shard paths and steps from `counts`.

    Returns its path and warnings (shards resized to a size training will resize again).
    """
    from omegaconf import OmegaConf

    base = OmegaConf.load(ROOT / "configs" / f"{name}.yaml")
    manifest_splits = json.loads((shards / MANIFEST).read_text(encoding="utf-8"))["splits"]
    for key, split in (("train_a", "trainA"), ("train_b", "trainB"), ("test_a", "testA"), ("test_b", "testB")):
        entry = manifest_splits.get(split)
        OmegaConf.update(base, f"data.{key}", split_pattern(shards, split) if entry and entry["pattern"] else "")
    larger = max(counts.get("trainA", 0), counts.get("trainB", 0))
    OmegaConf.update(base, "train.steps", EPOCHS * larger)
    path = set_dir / "train.yaml"
    header = (f"# configs/{name}.yaml with the shards datasets/cyclegan_sets.py wrote on this machine (absolute\n"
              f"# paths) and train.steps = {EPOCHS} epochs of the larger training domain ({larger:,} images) at "
              f"batch 1.\n# Train: python -m pipeline.train --config {path.resolve()}\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + OmegaConf.to_yaml(base), encoding="utf-8")
    try:
        cfg = load_config([tmp])  # Schema-checked before it replaces anything.
    except ConfigError:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    warnings = []
    if resize is not None and cfg.data.preprocess == "resize_and_crop" and resize != cfg.data.load_size:
        warnings.append(f"shards resized to {resize} px but data.load_size is {cfg.data.load_size}: training "
                        f"resizes again; re-shard with --resize {cfg.data.load_size} or train with "
                        f"data.load_size={resize}")
    return path, warnings


def _extract_set(name: str, base_url: str, set_dir: Path, retries: int, timeout: float, retry_wait_s: float,
                 keep_zip: bool, progress: bool, say: Any) -> tuple[dict[str, int], list[str]]:
    """Find or download the set's zip, verify it and extract it to set_dir/images; returns its `count_layout`.

    Only a zip this call downloaded is removed (after extraction, unless `keep_zip`): a mirror's zip, or one
    found in set_dir (put there by hand, or kept by an earlier run), stays where it is.
    """
    images, zip_path = set_dir / "images", set_dir / f"{name}.zip"
    local = _local_base(base_url)
    downloaded = False
    if local is not None:
        source = local / f"{name}.zip"
        if not source.is_file():
            raise RecipeError(f"{source} does not exist; --base-url {base_url} must hold {name}.zip")
        verify_zip(source, str(source))
        say(f"  verified {source} (read in place)")
    elif zip_path.is_file():
        source = zip_path
        try:
            verify_zip(zip_path, str(zip_path))
        except RecipeError as err:
            raise RecipeError(f"{err}; it was found in place and is left there: delete it to download the set "
                              "again, or replace it with an intact copy") from None
        say(f"  verified {zip_path} (found in place; not removed)")
    elif name == "cityscapes" and base_url.rstrip("/") == DEFAULT_BASE_URL:
        raise RecipeError(CITYSCAPES_HELP.format(images=images, zip=zip_path))
    else:
        source = download(zip_url(base_url, name), zip_path, retries, timeout, retry_wait_s, progress, say)
        downloaded = True
    try:
        layout = extract(source, set_dir, name, say)
    except RecipeError as err:
        if source == zip_path:
            hint = (f"{zip_path} is kept and reused by the next run: delete it to download it again (after fixing "
                    "--base-url if it names the wrong file), or replace it")
        else:
            hint = f"{source} is read in place: fix it, or point --base-url elsewhere"
        raise RecipeError(f"{err}; {hint}") from None
    if downloaded and not keep_zip:
        zip_path.unlink()
        say(f"  removed {zip_path.name} (images/ holds its verified contents; --keep-zip keeps it)")
    return layout


def prepare(name: str, base_url: str = DEFAULT_BASE_URL, root: str | os.PathLike[str] = "data",
            workers: int = 1, resize: int | None = None, format: str | None = None,
            quality: int = DEFAULT_QUALITY, shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
            maxcount: int = DEFAULT_MAXCOUNT,
            retries: int = 3, timeout: float = 60.0, retry_wait_s: float = 2.0, keep_zip: bool = False,
            force: bool = False, progress: bool = True, say: Any = print) -> SetResult:
    """Download (resuming), verify, extract and shard one set into root/<name>/, and write its train.yaml.

    Args:
        name: one of NAMES.
        base_url: where <name>.zip lives: an http(s) URL, or a local folder / file: URL (read in place).
        root: folder of all sets; this one goes to root/<name>/ (images/, shards/, train.yaml).
        workers, resize, format, quality, shuffle_seed, maxcount: pipeline.data.shards.write_shards options.
        retries, timeout, retry_wait_s: download behaviour (see `download`).
        keep_zip: keep the zip this run downloaded after extraction (a local base URL's zip, and one found in
            root/<name>/, are never removed).
        force: redo the shards even if complete with the same options (encoding, shuffle seed, maxcount).
        progress: show download and sharding progress on stderr.
        say: where progress lines go.

    Raises:
        RecipeError: the set cannot be downloaded, is not an intact zip, or is not in the reference layout.
        ShardError: sharding failed.
    """
    encoding = make_encoding(resize, format, quality)
    options = encoding.manifest_options(shuffle_seed, maxcount, DEFAULT_MAXSIZE)  # As write_shards records them.
    set_dir = Path(root) / name
    images, shards = set_dir / "images", set_dir / "shards"
    result = SetResult(name, expected=EXPECTED_TRAIN.get(name))
    say(f"{name}:")

    manifest = None if force else _complete_manifest(shards, options)
    if manifest is not None:
        result.already_complete = True
        say(f"  already complete: {shards / MANIFEST}")
        counts, extras = count_layout(images, str(images)) if images.is_dir() else ({}, [])
    else:
        # Download (or find) and extract the zip, unless the images are already extracted.
        if images.is_dir():
            counts, extras = count_layout(images, str(images))
        else:
            counts, extras = _extract_set(name, base_url, set_dir, retries, timeout, retry_wait_s, keep_zip, progress,
                                          say)
        say("  layout ok: " + ", ".join(f"{s} {n:,}" for s, n in counts.items()) + " images")
        # Shard; shards without a manifest are an interrupted run's: replaced.
        manifest = write_shards(images, shards, splits=[s for s in SPLITS if s in counts], maxcount=maxcount,
                                overwrite=True, workers=workers, resize=resize, format=format, quality=quality,
                                shuffle_seed=shuffle_seed, progress=progress)
    result.skipped = len(manifest.get("skipped", []))
    sharded = {split: entry["count"] for split, entry in manifest["splits"].items()}
    result.counts, result.extras = counts or sharded, extras
    if result.extras:
        result.warnings.append(f"folders {', '.join(result.extras)} are not part of the unpaired layout: not sharded")
    if result.skipped:
        result.warnings.append(f"{result.skipped} unreadable image(s) skipped: listed in {shards / MANIFEST}")
    if result.expected is not None:
        found = (result.counts.get("trainA", 0), result.counts.get("trainB", 0))
        if found != result.expected:
            result.warnings.append(f"trainA/trainB hold {found[0]:,}/{found[1]:,} images; the reference's {name} "
                                   f"has {result.expected[0]:,}/{result.expected[1]:,} (a different version?)")
    result.shards = shards
    result.train_config, extra = write_train_config(name, set_dir, shards, sharded, resize)
    result.warnings.extend(extra)
    return result


def _report(result: SetResult, root: Path, say: Any) -> None:
    counts = ", ".join(f"{split} {n:,}" for split, n in result.counts.items())
    expected = ""
    if result.expected is not None:
        same = (result.counts.get("trainA"), result.counts.get("trainB")) == result.expected
        expected = " (train counts as the reference's)" if same else " (train counts differ from the reference's)"
    else:
        expected = " (no reference counts recorded for this set)"
    say(f"  images: {counts}{expected}")
    manifest = json.loads((result.shards / MANIFEST).read_text(encoding="utf-8"))
    size = sum(s["bytes"] for e in manifest["splits"].values() for s in e["shards"])
    shard_count = sum(len(e["shards"]) for e in manifest["splits"].values())
    options = manifest.get("options") or {}
    shown = ", ".join(f"{k}={'keep' if v is None and k != 'shuffle_seed' else v}" for k, v in options.items()
                      if k != "quality" or v is not None)
    say(f"  shards: {shard_count} tar(s), {size / 1e6:,.1f} MB in {result.shards} ({shown})")
    for warning in result.warnings:
        say(f"  WARNING: {warning}")
    say(f"  train: python -m pipeline.train --config {result.train_config}")
    if Path.cwd().resolve() == ROOT and root.resolve() == ROOT / "data":
        steps = "its steps from the reference's counts" if result.name in EXPECTED_TRAIN else "the default steps"
        say(f"     or: python -m pipeline.train --config configs/{result.name}.yaml  (the same shards; {steps})")


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse counts that no run can use before anything is downloaded."""
    for flag, value, least in (("--maxcount", args.maxcount, 1), ("--workers", args.workers, 1),
                               ("--retries", args.retries, 0)):
        if value < least:
            raise RecipeError(f"{flag} must be at least {least}, got {value}")
    if args.timeout <= 0 or args.retry_wait < 0:
        raise RecipeError(f"--timeout must be positive and --retry-wait not negative, got {args.timeout} and "
                          f"{args.retry_wait}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry: 0 when every set is ready, 1 when one failed (the others are still done), 2 usage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="sets: " + ", ".join(NAMES))
    parser.add_argument("names", nargs="+", help="set names, or 'all'")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help=f"where <name>.zip lives: http(s) URL or local folder (default {DEFAULT_BASE_URL})")
    parser.add_argument("--root", type=Path, default=Path("data"), help="output folder of all sets (default data)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="sharding processes (default: the CPU count, at most 8)")
    parser.add_argument("--resize", type=int, default=None, metavar="SIDE",
                        help="resize to SIDE x SIDE at shard time (286 = data.load_size: training decodes less)")
    parser.add_argument("--format", choices=["jpeg", "jpg", "png", "webp"], default=None,
                        help="re-encode at shard time (default: keep)")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG/WebP quality when re-encoding")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=DEFAULT_SHUFFLE_SEED,
                       help=f"seed of the random file order across shards (default {DEFAULT_SHUFFLE_SEED})")
    order.add_argument("--no-shuffle", dest="shuffle_seed", action="store_const", const=None,
                       help="keep sorted file order")
    parser.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard at most")
    parser.add_argument("--retries", type=int, default=3, help="download retries (each resumes)")
    parser.add_argument("--retry-wait", type=float, default=2.0, help="seconds before the first retry (doubles)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a connection may stay silent")
    parser.add_argument("--keep-zip", action="store_true", help="keep the downloaded zip after extraction")
    parser.add_argument("--force", action="store_true", help="re-shard sets that are already complete")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        names = resolve_names(args.names)
        make_encoding(args.resize, args.format, args.quality)
        _check_numbers(args)
    except (RecipeError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def say(line: str) -> None:
        print(line, flush=True)  # Flushed: in order with the progress lines on stderr.

    failed = []
    for name in names:
        try:
            result = prepare(name, args.base_url, args.root, args.workers, args.resize, args.format, args.quality,
                             args.shuffle_seed, args.maxcount, args.retries, args.timeout, args.retry_wait,
                             args.keep_zip, args.force, not args.no_progress, say)
        except (RecipeError, ShardError, ConfigError, OSError) as err:
            print(f"error: {name}: {err}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        except (zipfile.BadZipFile, ValueError) as err:  # Named and explained by prepare where it can; a net.
            print(f"error: {name}: {type(err).__name__}: {err}; a file under {args.root / name} is damaged: remove "
                  "the file named (or that folder) and run again", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        except KeyboardInterrupt:
            print(f"\ninterrupted during {name}: run the same command again to resume", file=sys.stderr)
            return 130
        _report(result, args.root, say)
    if failed:
        print(f"failed: {', '.join(failed)} (errors above; running again resumes where each set stopped)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
