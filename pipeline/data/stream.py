"""Shards -> two seeded, infinite, shuffled streams (A and B) -> unpaired training batches.

Every rank and every DataLoader worker draws its own stream: its seed is derived from (seed, rank, worker,
domain). A stream visits the shards in a freshly shuffled order on each pass, mixes samples through a seeded
shuffle buffer, and augments sample number k with a generator seeded by (stream seed, k). So the stream is a
pure function of its seed, and resuming at step s skips the samples already consumed without decoding them.

Streams are infinite and training runs a fixed number of steps, so no rank runs out of data before another
(WebDataset's split_by_node would give ranks unequal batch counts and hang DDP).
"""

from __future__ import annotations

import glob
import io
import logging
import math
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from pipeline.data.images import to_uint8_tensor
from pipeline.data.remote import ShardUnreachable, retrying_samples, shard_problem
from pipeline.data.skips import DEFAULT_MAX_PIXELS, IMAGE_KEYS, Skips, image_member, name_of, unusable

log = logging.getLogger(__name__)

__all__ = ["IMAGE_KEYS", "DataError", "DomainStream", "UnpairedBatches", "decode_image", "expand_pattern",
           "train_loader"]


class DataError(RuntimeError):
    """A shard pattern or shard that cannot feed training, with what to do about it."""


def local_path(url: str) -> str | None:
    """The file a shard URL names when it is local (a plain path or file:PATH); None for pipe: and network URLs."""
    if "://" in url or url.startswith("pipe:"):
        return None
    return url.removeprefix("file:")


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def _folder_of_images(folder: Path, look_at: int = 2000) -> bool:
    """Whether `folder` (subfolders included) holds image files; looks at a bounded number of entries."""
    for i, path in enumerate(folder.rglob("*")):
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            return True
        if i >= look_at:
            break
    return False


def _expand_folder(folder: Path, pattern: str, key: str) -> list[str]:
    """A local folder named as a shard pattern: its shards (`DIR` means `DIR/*.tar`), or an error saying what
    to run when it is a folder of images."""
    shards = sorted(str(p) for p in folder.glob("*.tar"))
    if shards:
        return shards
    named = f"{key}='{pattern}'" if key else f"'{pattern}'"
    if _folder_of_images(folder):
        out = folder.parent / "shards"
        raise DataError(
            f"{named} is a folder of images; training reads WebDataset shards. Shard it once with "
            f"`python -m pipeline.shards {folder.parent} {out} --splits {folder.name}` and then set "
            f"{key or 'the pattern'}='{out / folder.name}' (a folder of shards means its *.tar)"
        )
    raise DataError(f"{named} is a folder with no shards (*.tar) and no images in it; check the path")


def expand_pattern(pattern: str, key: str = "") -> list[str]:
    """Shard URLs of a pattern (brace expansion, and glob for local paths; '::' joins several patterns).

    Local paths (plain or file:) are globbed and checked here, so a typo fails at start-up, not in a worker.
    A local folder stands for the shards in it (`DIR` means `DIR/*.tar`); a folder of images is an error that
    gives the `pipeline.shards` command to run.

    Args:
        pattern: the shard pattern.
        key: the config key it came from (`data.train_a`), named in error messages.
    """
    if not pattern:
        raise DataError("empty shard pattern: set data.train_a / data.train_b to your shards")
    urls = []
    named = f"{key}='{pattern}'" if key else f"shard pattern '{pattern}'"
    for url in wds.shardlists.expand_urls(pattern):
        path = local_path(url)
        if path is not None and any(ch in path for ch in "*?["):
            matches = sorted(glob.glob(path))
            if not matches:
                raise DataError(f"{named} matches no file ('{url}'); check the path")
            urls.extend(matches)
        elif path is not None and Path(path).is_dir():
            urls.extend(_expand_folder(Path(path), pattern, key))
        else:
            urls.append(url)
    missing = [path for path in map(local_path, urls) if path is not None and not Path(path).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(
            f"{named} names {len(missing)} missing file(s): {shown}. "
            "Check the path, or create shards with `python -m pipeline.shards SRC OUT`."
        )
    return urls


def count_local_samples(paths: list[str], at_least: int, skips: Skips | None = None) -> int:
    """Samples with an image member in the local shard files `paths`, counted up to `at_least`.

    Reads tar headers only (members are skipped by seeking), and stops as soon as `at_least` is reached, so
    the start-up check costs one header read for the usual batch of 1. A shard that is not a readable tar is
    left out of the count (and recorded in `skips`): the stream skips it too.
    """
    count = 0
    for path in paths:
        try:
            with tarfile.open(path, "r:") as tar:
                key = None
                for info in tar:
                    prefix, suffix = base_plus_ext(info.name) if info.isreg() else (None, None)
                    if prefix is None or prefix == key or suffix.lower() not in IMAGE_KEYS:
                        continue
                    key = prefix
                    count += 1
                    if count >= at_least:
                        return count
        except (tarfile.TarError, OSError) as err:
            if skips is not None:
                skips.shard(path, shard_problem(err))
    return count


def _domain_label(domain: str, pattern: str) -> str:
    return f"domain {domain}: shard pattern '{pattern}'"


def _fewer_than_a_batch(holders: str, count: int, batch_per_rank: int, skips: Skips | None = None) -> DataError:
    """The error for a domain smaller than one batch; `holders` is its subject and verb ("... holds")."""
    described = skips.describe() if skips is not None else ""
    skipped = f" ({described})" if described else ""
    if count == 0:
        return DataError(f"{holders} no usable sample{skipped}: check its shards with `python -m pipeline.shards "
                         "inspect PATTERN` and write them again from the images")
    return DataError(f"{holders} {count} sample(s){skipped}, fewer than one batch (data.batch_per_rank="
                     f"{batch_per_rank}); point it at the full set or lower data.batch_per_rank")


def check_enough_samples(pattern: str, urls: list[str], batch_per_rank: int, domain: str) -> None:
    """Refuse local shards that hold fewer samples than one batch; remote ones are checked on their first pass.

    Raises:
        DataError: naming the pattern, the domain and data.batch_per_rank.
    """
    paths = [local_path(url) for url in urls]
    if None in paths:
        return
    skips = Skips(_domain_label(domain, pattern), report=False)
    count = count_local_samples(paths, batch_per_rank, skips)
    if count < batch_per_rank:
        raise _fewer_than_a_batch(f"{_domain_label(domain, pattern)} holds", count, batch_per_rank, skips)


@dataclass(frozen=True)
class Augment:
    """Train-time transform of SPEC.md: resize (bicubic), random crop, random flip, to [-1, 1]."""

    preprocess: str = "resize_and_crop"
    load_size: int = 286
    crop_size: int = 256
    flip: bool = True

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        if self.preprocess == "resize_and_crop" and img.size != (self.load_size, self.load_size):
            # Shards written with --resize LOAD_SIZE skip this, the costliest step of the transform.
            img = img.resize((self.load_size, self.load_size), Image.BICUBIC)
        elif self.preprocess == "scale_width_and_crop" and img.width != self.load_size:
            height = max(self.crop_size, round(img.height * self.load_size / img.width))
            img = img.resize((self.load_size, height), Image.BICUBIC)
        if self.preprocess != "none":
            if img.width < self.crop_size or img.height < self.crop_size:
                img = img.resize((max(img.width, self.crop_size), max(img.height, self.crop_size)), Image.BICUBIC)
            x = rng.randint(0, img.width - self.crop_size)
            y = rng.randint(0, img.height - self.crop_size)
            img = img.crop((x, y, x + self.crop_size, y + self.crop_size))
        else:
            # Networks downsample twice (resnet) or more: keep sides a multiple of 4.
            img = img.crop((0, 0, img.width - img.width % 4, img.height - img.height % 4))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(img)


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """The RGB image of a WebDataset sample (first of jpg/jpeg/png/webp members)."""
    key = image_member(sample)
    if key is None:
        raise DataError(f"sample '{sample.get('__key__')}' in {sample.get('__url__')} has no image member "
                        f"{IMAGE_KEYS}")
    return Image.open(io.BytesIO(sample[key])).convert("RGB")


def raw_samples(urls: list[str], rng: random.Random, shuffle_buffer: int, min_samples: int = 1,
                label: str = "", retry_s: float = 120.0, skips: Skips | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[dict[str, Any]]:
    """Undecoded usable samples forever: shards in a new random order each pass, mixed through a shuffle buffer.

    Unreadable shards and samples that are not usable images (judged from their headers) are left out before the
    buffer and recorded in `skips`. A pass with no usable sample, or a first pass with fewer than `min_samples`
    (one batch), raises DataError naming `label` and what was skipped; a network shard that fails for `retry_s`
    seconds in a row raises DataError naming its URL.
    """
    skips = skips if skips is not None else Skips(label)
    buffer: list[dict[str, Any]] = []
    first = True
    while True:
        order = list(urls)
        rng.shuffle(order)
        produced = 0
        for sample in _samples_of(order, retry_s, skips):
            reason = unusable(sample, max_pixels)
            if reason is not None:
                skips.sample(name_of(sample), reason)
                continue
            produced += 1
            if len(buffer) < shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        what = f"{label} holds" if label else f"shards {order[:3]}... hold"
        if produced == 0 or (first and produced < min_samples):
            raise _fewer_than_a_batch(what, produced, min_samples, skips)
        if first:
            skips.end_of_first_pass(produced)
        first = False


def _samples_of(urls: list[str], retry_s: float, skips: Skips) -> Iterator[dict[str, Any]]:
    for url in urls:
        delivered = 0
        try:
            for sample in retrying_samples(url, retry_s):
                delivered += 1
                yield sample
        except ShardUnreachable as err:
            raise DataError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - tarfile, the OS, webdataset and BadShard: the shard's own fault
            skips.shard(url, shard_problem(err), delivered)


class DomainStream:
    """An infinite stream of augmented images of one domain, a pure function of its seed."""

    def __init__(self, urls: list[str], seed: str, augment: Augment, shuffle_buffer: int, min_samples: int = 1,
                 label: str = "", retry_s: float = 120.0, report: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.urls = urls
        self.retry_s = retry_s
        self.seed = seed
        self.augment = augment
        self.shuffle_buffer = shuffle_buffer
        self.min_samples = min_samples
        self.label = label
        self.max_pixels = max_pixels
        self.skips = Skips(label, report)

    def iterate(self, skip: int = 0) -> Iterator[torch.Tensor]:
        """Images from position `skip` on; skipped samples are read but not decoded.

        Raises:
            DataError: as raw_samples, or when no sample decodes for ten passes' worth of samples in a row
                (headers that open but pixels that do not).
        """
        samples = raw_samples(self.urls, random.Random(f"{self.seed}:shards"), self.shuffle_buffer,
                              self.min_samples, self.label, self.retry_s, self.skips, self.max_pixels)
        failing = 0
        for index, sample in enumerate(samples):
            if index < skip:
                continue
            try:
                img = decode_image(sample)
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
                self.skips.sample(name_of(sample), f"undecodable ({type(err).__name__}: {err})")
                failing += 1
                if self.skips.first_pass and failing > 10 * (self.skips.first_pass + self.shuffle_buffer):
                    raise DataError(f"{self.label or 'a domain'}: none of the last {failing} samples decodes "
                                    f"({self.skips.describe()})") from None
                continue
            failing = 0
            yield self.augment(img, random.Random(f"{self.seed}:{index}"))


class UnpairedBatches(IterableDataset):
    """Zips the A and B streams of this rank and worker into (batch_a, batch_b) uint8 pairs.

    `start_batch` is the number of batches this rank has already consumed (the resumed step): DataLoader hands
    out worker batches round-robin, so worker w of W has produced ceil((start_batch - w) / W) of them.
    """

    def __init__(
        self,
        urls_a: list[str],
        urls_b: list[str],
        augment: Augment,
        batch_size: int,
        seed: int,
        rank: int,
        shuffle_buffer: int = 512,
        start_batch: int = 0,
        patterns: tuple[str, str] = ("", ""),
        retry_s: float = 120.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        self.max_pixels = max_pixels
        self.patterns = patterns
        self.retry_s = retry_s
        self.urls_a, self.urls_b = urls_a, urls_b
        self.augment = augment
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        done = max(0, math.ceil((self.start_batch - worker) / workers))
        skip = done * self.batch_size
        _set_pixel_limit(self.max_pixels)
        streams = [
            DomainStream(urls, f"{self.seed}:{self.rank}:{worker}:{domain}", self.augment, self.shuffle_buffer,
                         self.batch_size, _domain_label(domain, pattern) if pattern else "", self.retry_s,
                         report=self.rank == 0 and worker == 0, max_pixels=self.max_pixels)
            for urls, domain, pattern in ((self.urls_a, "A", self.patterns[0]), (self.urls_b, "B", self.patterns[1]))
        ]
        iter_a, iter_b = (stream.iterate(skip) for stream in streams)
        while True:
            batch_a = torch.stack([next(iter_a) for _ in range(self.batch_size)])
            batch_b = torch.stack([next(iter_b) for _ in range(self.batch_size)])
            yield batch_a, batch_b


def _set_pixel_limit(max_pixels: int) -> None:
    """PIL refuses images over twice its own limit while opening them: ours (data.max_image_pixels) decides."""
    Image.MAX_IMAGE_PIXELS = max(max_pixels, DEFAULT_MAX_PIXELS) if max_pixels else None


def train_loader(
    data_cfg: Any, seed: int, rank: int, start_batch: int = 0, pin_memory: bool = False,
    urls: dict[str, list[str]] | None = None,
) -> DataLoader:
    """DataLoader of unpaired (A, B) batches for one rank, resumed at `start_batch`.

    `urls` are the domains' shard URLs ("A", "B") as rank 0 expanded and checked them; without them the patterns
    are expanded and checked here.

    Raises:
        DataError: a pattern matches nothing, or its local shards hold fewer samples than one batch (checked
            here, before training starts; pipe: and http shards are checked on their first pass).
    """
    augment = Augment(data_cfg.preprocess, data_cfg.load_size, data_cfg.crop_size, data_cfg.flip)
    if urls is None:
        urls = {}
        for domain, pattern in (("A", data_cfg.train_a), ("B", data_cfg.train_b)):
            urls[domain] = expand_pattern(pattern, f"data.train_{domain.lower()}")
            check_enough_samples(pattern, urls[domain], data_cfg.batch_per_rank, domain)
    dataset = UnpairedBatches(
        urls["A"],
        urls["B"],
        augment,
        data_cfg.batch_per_rank,
        seed,
        rank,
        data_cfg.shuffle_buffer,
        start_batch,
        patterns=(data_cfg.train_a, data_cfg.train_b),
        retry_s=data_cfg.remote_retry_s,
        max_pixels=data_cfg.max_image_pixels,
    )
    workers = data_cfg.workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=False,
        # Its own generator: drawing worker seeds from the global RNG would make a resumed process's RNG
        # state differ from an uninterrupted one's (our streams are seeded independently of it anyway).
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
    )


