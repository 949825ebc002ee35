"""The one loader of held-out images: a folder (recursive), a single image file, or a shard pattern.

Sample grids during training, evaluation and translation all read their inputs through `iter_inputs`, so an
image has the same key, the same decoding and the same resize everywhere.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
from torch import Tensor
from webdataset.tariterators import tarfile_samples

from pipeline.data.images import resize_square, to_tensor
from pipeline.data.remote import shard_problem
from pipeline.data.shards import EXTENSIONS, list_images, sample_key
from pipeline.data.stream import DataError, decode_image, expand_pattern

log = logging.getLogger("pipeline.data")


@dataclass
class InputImage:
    name: str
    """Relative file name to write the translation under (the original's, for shards from name.txt)."""
    key: str
    """Sample key (shards) or the key `pipeline.shards` would give the file: pairs images across domains."""
    image: Image.Image


@dataclass
class LazyInput:
    """An image of a held-out source before decoding: its names are known, its pixels only once `load()` runs."""

    name: str
    key: str
    load: Callable[[], Image.Image]


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def lazy_inputs(source: str, skipped: list[str] | None = None) -> Iterator[LazyInput]:
    """The images of a folder (sorted, recursive), a single image file, or a shard pattern (in shard order), with
    their names and keys, decoded only by `load()`: a process that evaluates a share of a set decodes only it.

    A folder without images is read as shards (its `*.tar`), as training reads a folder. Unreadable shards are
    logged, appended to `skipped` and left out.
    """
    path = Path(source)
    files = list_images(path) if path.is_dir() else []
    if files:
        for file in files:
            relative = file.relative_to(path).as_posix()
            yield LazyInput(relative, sample_key(relative), lambda file=file: _open_rgb(file))
        return
    if path.suffix.lower() in EXTENSIONS:
        if not path.is_file():
            raise DataError(f"input image '{source}' does not exist")
        yield LazyInput(path.name, sample_key(path.name), lambda: _open_rgb(path))
        return
    count = 0
    for sample in _readable_samples(expand_pattern(source), skipped):
        key = sample["__key__"]
        ext = next((k for k in ("png", "jpg", "jpeg", "webp") if k in sample), "png")
        name = sample["name.txt"].decode("utf-8") if "name.txt" in sample else f"{key}.{ext}"
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            name = f"{key}.{ext}"  # Never write outside the output folder.
        count += 1
        yield LazyInput(name, key, lambda sample=sample: decode_image(sample))
    if not count:
        raise DataError(f"shard pattern '{source}' holds no samples")


def iter_inputs(source: str, skipped: list[str] | None = None) -> Iterator[InputImage]:
    """The decoded images of `source` (see `lazy_inputs`). Unreadable images are logged, appended to `skipped`
    and left out."""
    for item in lazy_inputs(source, skipped):
        try:
            image = item.load()
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
            _skip(skipped, item.name, err)
            continue
        yield InputImage(item.name, item.key, image)


def iter_selected(source: str, size: int = 0, limit: int = 0,
                  want: Callable[[int, str], bool] = lambda position, key: True) -> Iterator[tuple[int, str, Tensor]]:
    """(position, key, [-1, 1] tensor) of the first `limit` images of `source` (0: all) that `want(position, key)`
    selects, resized to `size` x `size` (0: as they are). Only those are decoded; positions count every image of
    the source, so shares taken by position are the same whatever is readable."""
    for position, item in enumerate(itertools.islice(lazy_inputs(source), limit or None)):
        if not want(position, item.key):
            continue
        try:
            image = item.load()
        except Exception as err:  # noqa: BLE001
            _skip(None, item.name, err)
            continue
        yield position, item.key, to_tensor(resize_square(image, size) if size else image)


def _readable_samples(urls: list[str], skipped: list[str] | None) -> Iterator[dict]:
    """The samples of each shard in order; a shard that cannot be read (empty, truncated, not a tar, gone) is
    named in a warning and in `skipped`, and the next one is read."""
    for url in urls:
        try:
            yield from tarfile_samples([{"url": url}])
        except Exception as err:  # noqa: BLE001 - tarfile, the OS and webdataset raise many types
            log.warning("skipping shard %s: %s", url, shard_problem(err))
            if skipped is not None:
                skipped.append(url)


def _skip(skipped: list[str] | None, name: str, err: Exception) -> None:
    log.warning("skipping unreadable image %s (%s: %s)", name, type(err).__name__, err)
    if skipped is not None:
        skipped.append(name)



def iter_tensors(source: str, size: int = 0, limit: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, [-1, 1] tensor) of the first `limit` images of `source` (0: all), resized to `size` x `size` (the
    test transform; 0 keeps each image's own size)."""
    for item in itertools.islice(iter_inputs(source), limit or None):
        yield item.key, to_tensor(resize_square(item.image, size) if size else item.image)


def held_out(source: str, count: int, size: int) -> tuple[list[str], torch.Tensor]:
    """The first `count` images of `source` (shard order, or sorted files), resized to `size`: their keys and a
    (count, 3, size, size) tensor; fewer when the set is smaller."""
    items = list(iter_tensors(source, size, count))
    if not items:
        raise DataError(f"held-out set '{source}' holds no readable images")
    return [key for key, _ in items], torch.stack([image for _, image in items])
