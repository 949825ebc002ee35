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
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from webdataset.tariterators import tarfile_samples

from pipeline.data.images import resize_square, resize_values, to_tensor
from pipeline.data.pixels import NATIVE_KEYS, PixelError, PixelFormat
from pipeline.data.remote import shard_problem
from pipeline.data.shards import EXTENSIONS, list_images, sample_key
from pipeline.data.skips import name_of
from pipeline.data.stream import DataError, decode_image, decode_native, expand_pattern

log = logging.getLogger("pipeline.data")


@dataclass
class NativeImage:
    """A decoded image of a domain that is not 8-bit RGB: (C, H, W) float32 in [-1, 1], and the window of stored
    values that maps to [-1, 1] (an image's own for percentile domains)."""

    values: Tensor
    window: tuple[float, float]

    @property
    def width(self) -> int:
        return int(self.values.shape[-1])

    @property
    def height(self) -> int:
        return int(self.values.shape[-2])


Decoded = Image.Image | NativeImage


@dataclass
class InputImage:
    name: str
    """Relative file name to write the translation under (the original's, for shards from name.txt)."""
    key: str
    """Sample key (shards) or the key `pipeline.shards` would give the file: pairs images across domains."""
    image: Decoded
    """8-bit RGB: the PIL image; other formats: a NativeImage."""


@dataclass
class LazyInput:
    """An image of a held-out source before decoding: its names are known, its pixels only once `load()` runs."""

    name: str
    key: str
    load: Callable[[], Decoded]


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _decoder(fmt: PixelFormat | None) -> Callable[[dict[str, Any]], Decoded]:
    """A sample dict -> its image, as domain `fmt` reads it (8-bit RGB: PIL, as always)."""
    if fmt is None or fmt.is_8bit_rgb:
        return decode_image

    def native(sample: dict[str, Any]) -> NativeImage:
        values, window, converted = decode_native(sample, fmt)
        if converted:
            log.warning("%s: converted (%s)", name_of(sample), converted)
        return NativeImage(values, window)

    return native


def _file_sample(path: Path) -> dict[str, Any]:
    return {"__key__": path.stem, "__url__": str(path.parent), EXTENSIONS[path.suffix.lower()]: path.read_bytes()}


def lazy_inputs(source: str, skipped: list[str] | None = None, fmt: PixelFormat | None = None) -> Iterator[LazyInput]:
    """The images of a folder (sorted, recursive), a single image file, or a shard pattern (in shard order), with
    their names and keys, decoded only by `load()`: a process that evaluates a share of a set decodes only it.
    `fmt`: the domain's pixel format (8-bit RGB, through PIL, when None).

    A folder without images is read as shards (its `*.tar`), as training reads a folder. Unreadable shards are
    logged, appended to `skipped` and left out.
    """
    path = Path(source)
    files = list_images(path) if path.is_dir() else []
    rgb = fmt is None or fmt.is_8bit_rgb
    decode = _decoder(fmt)
    if files:
        for file in files:
            relative = file.relative_to(path).as_posix()
            load = (lambda file=file: _open_rgb(file)) if rgb else (lambda file=file: decode(_file_sample(file)))
            yield LazyInput(relative, sample_key(relative), load)
        return
    if path.suffix.lower() in EXTENSIONS:
        if not path.is_file():
            raise DataError(f"input image '{source}' does not exist")
        yield LazyInput(path.name, sample_key(path.name),
                        (lambda: _open_rgb(path)) if rgb else (lambda: decode(_file_sample(path))))
        return
    count = 0
    for sample in _readable_samples(expand_pattern(source), skipped):
        key = sample["__key__"]
        ext = next((k for k in NATIVE_KEYS if k in sample), "png")
        name = sample["name.txt"].decode("utf-8") if "name.txt" in sample else f"{key}.{ext}"
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            name = f"{key}.{ext}"  # Never write outside the output folder.
        count += 1
        yield LazyInput(name, key, lambda sample=sample: decode(sample))
    if not count:
        raise DataError(f"shard pattern '{source}' holds no samples")


def iter_inputs(source: str, skipped: list[str] | None = None, fmt: PixelFormat | None = None) -> Iterator[InputImage]:
    """The decoded images of `source` (see `lazy_inputs`). Unreadable images are logged, appended to `skipped`
    and left out; an image its domain cannot take (PixelError) stops with a DataError naming it."""
    for item in lazy_inputs(source, skipped, fmt):
        try:
            image = item.load()
        except PixelError as err:
            raise DataError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
            _skip(skipped, item.name, err)
            continue
        yield InputImage(item.name, item.key, image)


def as_tensor(image: Decoded, size: int = 0) -> Tensor:
    """A decoded image as the networks take it, (C, H, W) in [-1, 1], resized to `size` x `size` (0: as it is):
    8-bit RGB as the reference's test transform (PIL bicubic), other formats by antialiased bicubic resizing of
    their float values."""
    if isinstance(image, NativeImage):
        return resize_values(image.values, size) if size else image.values
    return to_tensor(resize_square(image, size) if size else image)


def iter_selected(source: str, size: int = 0, limit: int = 0,
                  want: Callable[[int, str], bool] = lambda position, key: True,
                  fmt: PixelFormat | None = None) -> Iterator[tuple[int, str, Tensor]]:
    """(position, key, [-1, 1] tensor) of the first `limit` images of `source` (0: all) that `want(position, key)`
    selects, resized to `size` x `size` (0: as they are). Only those are decoded; positions count every image of
    the source, so shares taken by position are the same whatever is readable."""
    for position, item in enumerate(itertools.islice(lazy_inputs(source, fmt=fmt), limit or None)):
        if not want(position, item.key):
            continue
        try:
            image = item.load()
        except PixelError as err:
            raise DataError(str(err)) from None
        except Exception as err:  # noqa: BLE001
            _skip(None, item.name, err)
            continue
        yield position, item.key, as_tensor(image, size)


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



def iter_tensors(source: str, size: int = 0, limit: int = 0,
                 fmt: PixelFormat | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, [-1, 1] tensor) of the first `limit` images of `source` (0: all), resized to `size` x `size` (the
    test transform; 0 keeps each image's own size)."""
    for item in itertools.islice(iter_inputs(source, fmt=fmt), limit or None):
        yield item.key, as_tensor(item.image, size)


def held_out(source: str, count: int, size: int, fmt: PixelFormat | None = None) -> tuple[list[str], torch.Tensor]:
    """The first `count` images of `source` (shard order, or sorted files), resized to `size`: their keys and a
    (count, C, size, size) tensor; fewer when the set is smaller."""
    items = list(iter_tensors(source, size, count, fmt))
    if not items:
        raise DataError(f"held-out set '{source}' holds no readable images")
    return [key for key, _ in items], torch.stack([image for _, image in items])
