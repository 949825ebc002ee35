"""Shards -> two seeded, infinite, shuffled streams (A and B) -> unpaired training batches.

Every rank and every DataLoader worker draws its own stream: its seed is derived from (seed, rank, worker,
domain). A stream visits the shards in a freshly shuffled order on each pass, mixes samples through a seeded
shuffle buffer, and augments sample number k with a generator seeded by (stream seed, k). So the stream is a
pure function of its seed, and its state is small: the pass, the random state, the position in the current shard
and references to the buffered samples. A checkpoint holds it; resuming fetches the buffered samples and
continues the shard from its position, reading nothing else again.

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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from webdataset.tariterators import base_plus_ext

from pipeline.data.images import resize_values, to_uint8_tensor
from pipeline.data.pixels import NATIVE_KEYS, PixelError, PixelFormat, conform, native_member, read_native
from pipeline.data.remote import ShardUnreachable, retrying_samples, shard_problem
from pipeline.data.shard_reader import START, Located, Position, fetch
from pipeline.data.skips import DEFAULT_MAX_PIXELS, IMAGE_KEYS, Skips, image_member, name_of, unusable

log = logging.getLogger(__name__)

__all__ = ["IMAGE_KEYS", "DataError", "DomainStream", "UnpairedBatches", "decode_image", "expand_pattern",
           "train_loader"]


class DataError(RuntimeError):
    """A shard pattern or shard that cannot feed training, with what to do about it."""


class DomainMismatch(DataError):
    """An image its domain's settings cannot take (channels, depth, mode): a setting to change, the same in every
    shard, not one broken shard."""


def local_path(url: str) -> str | None:
    """The file a shard URL names when it is local (a plain path or file:PATH); None for pipe: and network URLs."""
    if "://" in url or url.startswith("pipe:"):
        return None
    return url.removeprefix("file:")


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".npy"}


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
                    if prefix is None or prefix == key or suffix.lower() not in NATIVE_KEYS:
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

    def tensor(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """The same transform, drawing the same random numbers, of a (C, H, W) float image in [-1, 1] (any
        channels and depth): antialiased bicubic resizing of the float values, clamped to [-1, 1] after it."""
        height, width = x.shape[-2:]
        if self.preprocess == "resize_and_crop" and (width, height) != (self.load_size, self.load_size):
            x = resize_values(x, self.load_size, self.load_size)
        elif self.preprocess == "scale_width_and_crop" and width != self.load_size:
            x = resize_values(x, max(self.crop_size, round(height * self.load_size / width)), self.load_size)
        if self.preprocess != "none":
            height, width = x.shape[-2:]
            if width < self.crop_size or height < self.crop_size:
                x = resize_values(x, max(height, self.crop_size), max(width, self.crop_size))
                height, width = x.shape[-2:]
            left = rng.randint(0, width - self.crop_size)
            top = rng.randint(0, height - self.crop_size)
            x = x[:, top : top + self.crop_size, left : left + self.crop_size]
        else:
            x = x[:, : height - height % 4, : width - width % 4]
        if self.flip and rng.random() < 0.5:
            x = x.flip(-1)
        return x.contiguous()


def decode_native(sample: dict[str, Any],
                  fmt: PixelFormat) -> tuple[torch.Tensor, tuple[float, float], str | None]:
    """A sample's image as its domain's (C, H, W) float32 in [-1, 1], the window of stored values mapped to
    [-1, 1], and the conversion made to fit the domain (None: none). Raises PixelError for an image the domain
    cannot take (see `pixels.conform`). Training's streams and the held-out sets decode through it."""
    key = native_member(sample)
    if key is None:
        raise DataError(f"sample '{sample.get('__key__')}' in {sample.get('__url__')} has no image member")
    array, what = read_native(sample[key], key)
    array, converted = conform(array, fmt, name_of(sample), what)
    unit, window = fmt.to_unit(array)
    return torch.from_numpy(unit).permute(2, 0, 1).contiguous(), window, converted


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """The RGB image of a WebDataset sample (first of jpg/jpeg/png/webp members)."""
    return open_image(sample).convert("RGB")


def open_image(sample: dict[str, Any]) -> Image.Image:
    """The image of a WebDataset sample (first of jpg/jpeg/png/webp members), in its own mode."""
    key = image_member(sample)
    if key is None:
        raise DataError(f"sample '{sample.get('__key__')}' in {sample.get('__url__')} has no image member "
                        f"{IMAGE_KEYS}")
    return Image.open(io.BytesIO(sample[key]))


def _rgb_conversion(mode: str, fmt: PixelFormat) -> str | None:
    """The conversion an 8-bit RGB domain makes of an image in `mode` (None: none): grayscale is a channel
    mismatch, counted (and refused with data.domain_*.mismatch=error); palette, alpha and CMYK are encodings."""
    if mode not in ("L", "LA", "1"):
        return None
    if fmt.mismatch == "error":
        raise PixelError(f"a grayscale image (mode {mode}) in an RGB domain, refused by {fmt.key}.mismatch=error; "
                         f"convert the file, or set {fmt.key}.mismatch=convert ({fmt.channels_key}=1 for a "
                         "grayscale domain)")
    return "grayscale images in a colour set (replicated)"


class ShuffledSamples:
    """Undecoded usable samples forever: shards in a new random order each pass, mixed through a shuffle buffer,
    with a state (`state_dict`) that says where the stream is, so a resumed stream reads no sample twice.

    The state is the pass, the random state at its start (which gives the pass's shard order) and now, the shard
    being read and the position in it of the next sample, and the buffered samples as references (shard,
    start, end), not bytes. `load_state_dict` fetches those samples again and continues the shard from its
    position: the samples that follow are the uninterrupted stream's, bit for bit.

    Unreadable shards and samples that are not usable images (judged from their headers) are left out before the
    buffer and recorded in `skips`. A pass with no usable sample, or a first pass with fewer than `min_samples`
    (one batch), raises DataError naming `label` and what was skipped; a network shard that fails for `retry_s`
    seconds in a row raises DataError naming its URL.
    """

    def __init__(self, urls: list[str], rng: random.Random, shuffle_buffer: int, min_samples: int = 1,
                 label: str = "", retry_s: float = 120.0, skips: Skips | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, fmt: PixelFormat | None = None) -> None:
        self.urls, self.rng, self.shuffle_buffer, self.min_samples = urls, rng, shuffle_buffer, min_samples
        self.fmt = fmt or PixelFormat()
        self.label, self.retry_s, self.max_pixels = label, retry_s, max_pixels
        self.skips = skips if skips is not None else Skips(label)
        self.passes = 0  # Passes completed.
        self.pass_rng: Any = None  # The random state that shuffled this pass's shard order.
        self.shard = 0  # Index in this pass's order of the shard being read.
        self.at = START  # Where its next sample starts.
        self.produced = 0  # Usable samples of this pass so far.
        self.buffer: list[dict[str, Any]] = []
        self.refs: list[tuple[int, int, int, int, int]] = []  # (url index, start offset, index, end offset, index)
        self._resumed = False

    def state_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "pass_rng": self.pass_rng, "rng": self.rng.getstate(), "shard": self.shard,
                "at": [self.at.offset, self.at.index], "produced": self.produced, "buffer": list(self.refs),
                "first_pass": self.skips.first_pass}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the buffered samples are fetched again (a seek or a range request each, or the
        shards they come from read again when they cannot seek)."""
        self.passes, self.shard, self.produced = state["passes"], state["shard"], state["produced"]
        self.pass_rng, self.at = state["pass_rng"], Position(*state["at"])
        self.rng.setstate(state["rng"])
        self.skips.first_pass = state["first_pass"]
        self.refs = [tuple(ref) for ref in state["buffer"]]
        self.buffer = self._fetch(self.refs)
        self._resumed = self.pass_rng is not None

    def _fetch(self, refs: list[tuple[int, ...]]) -> list[dict[str, Any]]:
        spans: dict[int, list[tuple[Position, Position]]] = {}
        for shard, *where in refs:
            spans.setdefault(shard, []).append((Position(*where[:2]), Position(*where[2:])))
        found: dict[tuple[int, Position], dict[str, Any]] = {}
        for shard, wanted in spans.items():
            try:
                got = fetch(self.urls[shard], wanted)
            except Exception as err:  # noqa: BLE001 - as when reading the shard: its own fault
                self.skips.shard(self.urls[shard], shard_problem(err))
                got = {}
            found.update({(shard, start): sample for start, sample in got.items()})
        kept = [(ref, found.get((ref[0], Position(*ref[1:3])))) for ref in refs]
        lost = sum(sample is None for _, sample in kept)
        if lost:
            log.warning("%s: %d of the %d samples the shuffle buffer held at the checkpoint can no longer be read "
                        "(%s); the stream continues without them, no longer bit for bit", self.label, lost,
                        len(refs), self.skips.describe() or "their shards changed")
        self.refs = [ref for ref, sample in kept if sample is not None]
        return [sample for _, sample in kept if sample is not None]

    def order(self) -> list[str]:
        """This pass's shard order (the shuffle of the random state at its start)."""
        order = list(self.urls)
        shuffler = random.Random()
        shuffler.setstate(self.pass_rng)
        shuffler.shuffle(order)
        return order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index_of = {url: i for i, url in enumerate(self.urls)}
        while True:
            if self._resumed:
                order = self.order()
            else:
                self.pass_rng, self.shard, self.at, self.produced = self.rng.getstate(), 0, START, 0
                order = list(self.urls)
                self.rng.shuffle(order)
            self._resumed = False
            while self.shard < len(order):
                url = order[self.shard]
                for item in self._samples_of(url, self.at):
                    self.at = item.end
                    sample = item.sample
                    try:
                        reason = unusable(sample, self.max_pixels, self.fmt)
                    except PixelError as err:
                        raise DomainMismatch(f"{self.label or 'a domain'}: {err}") from None
                    if reason is not None:
                        self.skips.sample(name_of(sample), reason)
                        continue
                    self.produced += 1
                    ref = (index_of[url], item.start.offset, item.start.index, item.end.offset, item.end.index)
                    if len(self.buffer) < self.shuffle_buffer:
                        self.buffer.append(sample)
                        self.refs.append(ref)
                        continue
                    index = self.rng.randrange(len(self.buffer))
                    self.buffer[index], sample = sample, self.buffer[index]
                    self.refs[index] = ref
                    yield sample
                self.shard, self.at = self.shard + 1, START
            first = self.passes == 0
            what = f"{self.label} holds" if self.label else f"shards {order[:3]}... hold"
            if self.produced == 0 or (first and self.produced < self.min_samples):
                raise _fewer_than_a_batch(what, self.produced, self.min_samples, self.skips)
            if first:
                self.skips.end_of_first_pass(self.produced)
            self.passes += 1

    def _samples_of(self, url: str, start: Position) -> Iterator[Located]:
        try:
            yield from retrying_samples(url, self.retry_s, start=start)
        except ShardUnreachable as err:
            raise DataError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - tarfile, the OS, webdataset and BadShard: the shard's own fault
            self.skips.shard(url, shard_problem(err), self.at.index)


class DomainStream:
    """An infinite stream of augmented images of one domain: a function of its seed, and resumable from its
    `state_dict` without reading again what it has delivered."""

    def __init__(self, urls: list[str], seed: str, augment: Augment, shuffle_buffer: int, min_samples: int = 1,
                 label: str = "", retry_s: float = 120.0, report: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, fmt: PixelFormat | None = None) -> None:
        self.seed = seed
        self.augment = augment
        self.fmt = fmt or PixelFormat()
        self.shuffle_buffer = shuffle_buffer
        self.label = label
        self.skips = Skips(label, report)
        self.samples = ShuffledSamples(urls, random.Random(f"{seed}:shards"), shuffle_buffer, min_samples, label,
                                       retry_s, self.skips, max_pixels, self.fmt)
        self.index = 0  # Samples taken from `samples` so far (sample k is augmented with a seed of k).
        self.failing = 0  # Samples in a row that did not decode.

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "index": self.index, "failing": self.failing,
                "samples": self.samples.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.index, self.failing = state["seed"], state["index"], state["failing"]
        self.samples.load_state_dict(state["samples"])

    def iterate(self, skip: int = 0) -> Iterator[torch.Tensor]:
        """Images from where the stream is (the start, or its loaded state), after skipping `skip` samples, read
        but not decoded (how a checkpoint without stream state is resumed).

        Raises:
            DataError: as ShuffledSamples, or when no sample decodes for ten passes' worth of samples in a row
                (headers that open but pixels that do not).
        """
        for sample in self.samples:
            index = self.index
            self.index += 1
            if index < skip:
                continue
            try:
                img, converted = self._decode(sample)
            except PixelError as err:
                raise DomainMismatch(f"{self.label or 'a domain'}: {err}") from None
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
                self.skips.sample(name_of(sample), f"undecodable ({type(err).__name__}: {err})")
                self.failing += 1
                if self.skips.first_pass and self.failing > 10 * (self.skips.first_pass + self.shuffle_buffer):
                    raise DataError(f"{self.label or 'a domain'}: none of the last {self.failing} samples decodes "
                                    f"({self.skips.describe()})") from None
                continue
            self.failing = 0
            if converted:
                self.skips.converted(name_of(sample), converted)
            rng = random.Random(f"{self.seed}:{index}")
            yield self.augment(img, rng) if isinstance(img, Image.Image) else self.augment.tensor(img, rng)

    def _decode(self, sample: dict[str, Any]) -> tuple[Image.Image | torch.Tensor, str | None]:
        """8-bit RGB through PIL (unchanged: the golden losses), anything else as a float tensor."""
        if not self.fmt.is_8bit_rgb:
            values, _, converted = decode_native(sample, self.fmt)
            return values, converted
        img = open_image(sample)
        return img.convert("RGB"), _rgb_conversion(img.mode, self.fmt)


class UnpairedBatches(IterableDataset):
    """Zips the A and B streams of this rank and worker into (batch_a, batch_b) uint8 pairs.

    Its iterator has a state (the streams' states, taken by StatefulDataLoader after each batch in the worker that
    made it), so a checkpoint holds where every stream of the rank is. `start_batch` resumes a checkpoint that has
    no stream state (written by an earlier version) the old way, by reading again what the rank consumed:
    DataLoader hands out worker batches round-robin, so worker w of W has produced ceil((start_batch - w) / W) of
    them. `fresh_from` > 0 starts new streams at that step (after a change of world size), seeded apart from the
    streams the run began with so that they do not repeat its first samples.
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
        fresh_from: int = 0,
        formats: tuple[PixelFormat, PixelFormat] | None = None,
    ) -> None:
        super().__init__()
        self.formats = formats or (PixelFormat(), PixelFormat(key="data.domain_b", channels_key="model.channels_b"))
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
        self.fresh_from = fresh_from

    def __iter__(self) -> _Batches:
        return _Batches(self)

    def streams(self, worker: int) -> list[DomainStream]:
        salt = f":from{self.fresh_from}" if self.fresh_from else ""
        return [
            DomainStream(urls, f"{self.seed}:{self.rank}:{worker}:{domain}{salt}", self.augment, self.shuffle_buffer,
                         self.batch_size, _domain_label(domain, pattern) if pattern else "", self.retry_s,
                         report=self.rank == 0 and worker == 0, max_pixels=self.max_pixels, fmt=fmt)
            for urls, domain, pattern, fmt in ((self.urls_a, "A", self.patterns[0], self.formats[0]),
                                               (self.urls_b, "B", self.patterns[1], self.formats[1]))
        ]


class _Batches:
    """One worker's batches; its streams start at the first `next` (after a `load_state_dict`, if any)."""

    def __init__(self, dataset: UnpairedBatches) -> None:
        self.dataset = dataset
        self.loaded: dict[str, Any] | None = None
        self.streams: list[DomainStream] = []
        self.iters: list[Iterator[torch.Tensor]] = []

    def __iter__(self) -> _Batches:
        return self

    def state_dict(self) -> dict[str, Any]:
        if not self.streams:
            return dict(self.loaded or {})
        return {"A": self.streams[0].state_dict(), "B": self.streams[1].state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state

    def _start(self) -> None:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        _set_pixel_limit(self.dataset.max_pixels)
        self.streams = self.dataset.streams(worker)
        skip = 0
        if self.loaded:
            for stream, domain in zip(self.streams, "AB"):
                stream.load_state_dict(self.loaded[domain])
        else:
            skip = max(0, math.ceil((self.dataset.start_batch - worker) / workers)) * self.dataset.batch_size
        self.iters = [stream.iterate(skip) for stream in self.streams]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.iters:
            self._start()
        iter_a, iter_b = self.iters
        size = self.dataset.batch_size
        batch_a = torch.stack([next(iter_a) for _ in range(size)])
        batch_b = torch.stack([next(iter_b) for _ in range(size)])
        return batch_a, batch_b


def _set_pixel_limit(max_pixels: int) -> None:
    """PIL refuses images over twice its own limit while opening them: ours (data.max_image_pixels) decides."""
    Image.MAX_IMAGE_PIXELS = max(max_pixels, DEFAULT_MAX_PIXELS) if max_pixels else None


def train_loader(
    data_cfg: Any, seed: int, rank: int, start_batch: int = 0, pin_memory: bool = False,
    urls: dict[str, list[str]] | None = None, state: dict[str, Any] | None = None, fresh_from: int = 0,
    formats: dict[str, PixelFormat] | None = None,
) -> StatefulDataLoader:
    """DataLoader of unpaired (A, B) batches for one rank: from the start, from a saved `state` (its
    `state_dict()`, as a checkpoint holds it), or (a checkpoint without one) by re-reading `start_batch` batches.

    torchdata's StatefulDataLoader does the bookkeeping a resumable loader needs: it takes each worker's stream
    state right after the batch it belongs to, keeps the states of the batches training has consumed (not of
    those prefetched), and on load restores each worker and which worker's batch comes next.

    `urls` are the domains' shard URLs ("A", "B") as rank 0 expanded and checked them; without them the patterns
    are expanded and checked here. `fresh_from`: see UnpairedBatches. `formats`: the domains' PixelFormat ("A",
    "B"; `pixels.formats_from(cfg)`), 8-bit RGB when None.

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
        start_batch if state is None else 0,
        patterns=(data_cfg.train_a, data_cfg.train_b),
        retry_s=data_cfg.remote_retry_s,
        max_pixels=data_cfg.max_image_pixels,
        fresh_from=fresh_from,
        formats=(formats["A"], formats["B"]) if formats else None,
    )
    workers = data_cfg.workers
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, which torch >= 2.9 deprecates: nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        loader = _loader(dataset, workers, data_cfg.prefetch_factor, pin_memory, seed * 1000 + rank)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def _loader(dataset: UnpairedBatches, workers: int, prefetch_factor: int, pin_memory: bool,
            seed: int) -> StatefulDataLoader:
    return StatefulDataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=False,
        # Its own generator: drawing worker seeds from the global RNG would make a resumed process's RNG
        # state differ from an uninterrupted one's (our streams are seeded independently of it anyway).
        generator=torch.Generator().manual_seed(seed),
        snapshot_every_n_steps=1,
    )
