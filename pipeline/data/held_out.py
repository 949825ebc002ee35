"""The one loader of held-out images: a folder (recursive), a single image file, or a shard pattern.

Sample grids during training, evaluation and translation all read their inputs through `iter_inputs`, so an
image has the same key, the same decoding and the same resize everywhere.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
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


def iter_inputs(source: str, skipped: list[str] | None = None) -> Iterator[InputImage]:
    """The images of a folder (sorted, recursive), a single image file, or a shard pattern (in shard order).

    A folder without images is read as shards (its `*.tar`), as training reads a folder. Unreadable images are
    logged, appended to `skipped` and left out.
    """
    path = Path(source)
    files = list_images(path) if path.is_dir() else []
    if files:
        for file in files:
            relative = file.relative_to(path).as_posix()
            try:
                with Image.open(file) as img:
                    image = img.convert("RGB")
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
                _skip(skipped, relative, err)
                continue
            yield InputImage(relative, sample_key(relative), image)
        return
    if path.suffix.lower() in EXTENSIONS:
        if not path.is_file():
            raise DataError(f"input image '{source}' does not exist")
        with Image.open(path) as img:
            yield InputImage(path.name, sample_key(path.name), img.convert("RGB"))
        return
    count = unreadable = 0
    for sample in _readable_samples(expand_pattern(source), skipped):
        key = sample["__key__"]
        ext = next((k for k in ("png", "jpg", "jpeg", "webp") if k in sample), "png")
        name = sample["name.txt"].decode("utf-8") if "name.txt" in sample else f"{key}.{ext}"
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            name = f"{key}.{ext}"  # Never write outside the output folder.
        try:
            image = decode_image(sample)
        except Exception as err:  # noqa: BLE001
            _skip(skipped, name, err)
            unreadable += 1
            continue
        count += 1
        yield InputImage(name, key, image)
    if not count and not unreadable:
        raise DataError(f"shard pattern '{source}' holds no samples")


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
