"""Held-out evaluation of a pair of generators: FID/KID, paired L1/PSNR/SSIM and cycle error per direction.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.data.held_out import iter_selected, lazy_inputs
from pipeline.data.images import (
    normalize,
    project_channels,
    quantize,
    resize_values,
    to_image,
    to_tensor,
    to_uint8,
)
from pipeline.data.pixels import PixelFormat, formats_from, quantize_to
from pipeline.data.stream import DataError, expand_pattern, local_path
from pipeline.engine import dist
from pipeline.eval.metrics import distribution, paired
from pipeline.eval.metrics.features import load_extractor
from pipeline.infer.generators import required_multiple
from pipeline.infer.translate import translate_images

log = logging.getLogger("pipeline.evaluate")


# Held-out evaluation of one direction.


@dataclass(frozen=True)
class Share:
    """Which images of a held-out set this process evaluates: those whose position is `rank` modulo `world`.

    The ranks of a run each take their share and gather features and per-image scores, so N ranks evaluate
    about N times faster and get the numbers of one process evaluating everything (rows reordered to the set's
    order before any metric sees them).
    """

    rank: int = 0
    world: int = 1

    def takes(self, index: int) -> bool:
        return index % self.world == self.rank

    @classmethod
    def of_process_group(cls) -> Share:
        """This rank's share under torch.distributed; the whole set otherwise."""
        if not dist.is_distributed():
            return cls()
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())


@dataclass
class RealSet:
    """A real target set's features as the metrics need them, kept from one evaluation to the next: the set and
    the extractor do not change while a run trains, so its images are decoded and embedded once."""

    moments: distribution.Moments | None = None
    """Their moments, summed over ranks (FID); `moments.count` is the number of real images."""
    rows: np.ndarray | None = None
    """Their features in the set's order, on rank 0 only (KID)."""

    @property
    def ready(self) -> bool:
        return self.moments is not None


class _Features:
    """Runs an extractor over images of any sizes, batching images of equal size; collects (index, row)."""

    def __init__(self, extractor: nn.Module | None, device: torch.device, batch_size: int) -> None:
        self.extractor, self.device, self.batch_size = extractor, device, batch_size
        self.pending: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
        self.indices: list[int] = []
        self.rows: list[np.ndarray] = []

    def add(self, index: int, image: Tensor) -> None:
        if self.extractor is None:
            return
        group = self.pending.setdefault(tuple(image.shape), [])
        group.append((index, image))
        if len(group) >= self.batch_size:
            self._run(tuple(image.shape))
        elif sum(map(len, self.pending.values())) > 4 * self.batch_size:  # Many sizes: do not hoard images.
            self._run(max(self.pending, key=lambda shape: len(self.pending[shape])))

    def _run(self, shape: tuple[int, ...]) -> None:
        items = self.pending.pop(shape)
        batch = torch.stack([image for _, image in items]).to(self.device)
        self.indices.extend(index for index, _ in items)
        self.rows.append(self.extractor(batch).double().cpu().numpy())

    def result(self) -> tuple[list[int], np.ndarray]:
        """(set positions, their feature rows) of this process's images."""
        for shape in list(self.pending):
            self._run(shape)
        return self.indices, (np.concatenate(self.rows) if self.rows else np.zeros((0, 0)))


def _in_set_order(parts: list[tuple[list[int], np.ndarray]]) -> np.ndarray:
    """Every rank's (positions, rows) as one (N, D) array in the set's order."""
    indices = [i for part_indices, _ in parts for i in part_indices]
    rows = [rows for part_indices, rows in parts if len(part_indices)]
    if not rows:
        return np.zeros((0, 0))
    return np.concatenate(rows)[np.argsort(indices, kind="stable")]


@torch.no_grad()
def evaluate_direction(
    net: nn.Module, reverse: nn.Module | None, multiple: int, source: str, target: str, device: torch.device,
    features: nn.Module | None = None, size: int = 0, paired_keys: bool = False, batch_size: int = 8,
    precision: str = "fp32", max_images: int = 0, kid_subsets: int = 100, kid_subset_size: int = 1000,
    share: Share = Share(), real_set: RealSet | None = None,
    formats: tuple[PixelFormat, PixelFormat] | None = None,
) -> dict[str, float]:
    """Metrics of `net` translating the images of `source`, against the real images of `target`.

    Args:
        net: the generator of this direction (its eval mode is used); `reverse` the opposite one or None.
        multiple: side multiple the generators need (`pipeline.infer.generators.required_multiple`).
        source, target: image folders, files or shard patterns (held-out sets of the two domains).
        device: where the networks and the extractor run.
        features: feature extractor for FID/KID ((N, 3, H, W) in [-1, 1] -> (N, D)); None skips them.
        size: resize images to size x size first (the test transform); 0 keeps their sizes.
        paired_keys: `target` holds the ground truth of `source` under the same sample keys.
        batch_size: images per forward pass.
        precision: fp32, bf16 or fp16 for the generators.
        max_images: use at most this many images of each set (0: all).
        kid_subsets, kid_subset_size: KID's subsets.
        share: the images this process translates and embeds; with more than one process (`Share.world`),
            every process of the group must call this with its own share, and all get the whole set's result.
        real_set: the target set's features from an earlier call with the same target, size and extractor, used
            instead of embedding it again; an empty one is filled by this call.
        formats: the source's and the target's PixelFormat (8-bit RGB when None). Other formats are read at their
            depth, translations rounded to the target's levels (not 8 bits), and per-band statistics of real and
            translated images reported in stored units. FID/KID need 3 channels: a 1-channel target is
            replicated to 3 (reported as `fid_replicated`, `kid_replicated`); other band counts skip them.

    Returns:
        `images` and `real_images` (counts); `fid`, `kid`, `kid_subset_size` (0: whole sets) and `kid_std`
        (only over subsets smaller than the sets: see `distribution.kid`) with `features`; `pairs`, `l1`, `psnr`,
        `ssim` and the same of the untranslated input (`*_identity`) when paired (and `l1_units`, the L1 in the
        target's stored units, for formats other than 8-bit RGB with a fixed window); `cycle_l1` with `reverse`;
        `band<i>_mean`, `band<i>_std`, `band<i>_mean_real`, `band<i>_std_real` for formats other than 8-bit RGB.
    """
    source_fmt, target_fmt = formats or (PixelFormat(), PixelFormat())
    native = not target_fmt.is_8bit_rgb
    if features is not None and target_fmt.channels not in (1, 3):
        log.info("FID/KID skipped: they are defined for 3-channel images and the target has %d bands (per-band "
                 "statistics reported instead)", target_fmt.channels)
        features = None
    if features is not None and target_fmt.channels == 1:
        features = _Replicated(features)
    bands_real, bands_fake = _BandStats(), _BandStats()
    modes = [(m, m.training) for m in (net, reverse, features) if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        # This share's sources; with pairs, their keys first (one pass over the source set), so that each rank
        # keeps only its own ground truth.
        # Keys cost no decoding: every image is decoded by the one rank that uses it, whatever the world size.
        source_keys = ([item.key for item in itertools.islice(lazy_inputs(source, fmt=source_fmt),
                                                              max_images or None)]
                       if paired_keys else [])
        mine = {key for i, key in enumerate(source_keys) if share.takes(i)}

        # Real target images: features of this share, and the ground truth of this share's sources (8-bit).
        real = _Features(features, device, batch_size)
        truth: dict[str, Tensor] = {}
        real_count = 0
        known = features is not None and real_set is not None and real_set.ready
        embeds = (lambda i: share.takes(i)) if not known or native else (lambda i: False)  # noqa: E731
        if paired_keys and max_images:
            # The ground truth of the first max_images sources, not the first max_images of the target set:
            # shards hold their files in a shuffled order, so those would not pair.
            keys = set(source_keys)
            targets = iter_selected(target, size, 0, lambda i, key: key in keys and (embeds(i) or key in mine),
                                    target_fmt)
        else:
            targets = iter_selected(target, size, max_images, lambda i, key: embeds(i) or key in mine, target_fmt)
        if known and not paired_keys and not native:
            targets = iter(())  # Nothing to read: the features are known and no ground truth is needed.
        for index, key, image in targets:
            if embeds(index):
                real_count += 1
                if not known:
                    real.add(index, image)
                bands_real.add(image)
            if key in mine:
                truth[key] = image if native else to_uint8(image)
        real_features = real.result()

        # Translate, and run the reverse generator on the translations as they come (bounded memory).
        fake = _Features(features, device, batch_size)
        inputs: dict[int, Tensor] = {}
        per_image: dict[str, list[tuple[int, float]]] = {k: [] for k in _PER_IMAGE}
        count = 0

        def sources() -> Iterator[tuple[tuple[int, str], Tensor]]:
            for index, key, image in iter_selected(source, size, max_images, lambda i, key: share.takes(i),
                                                   source_fmt):
                inputs[index] = image
                yield (index, key), image

        def translations() -> Iterator[tuple[int, Tensor]]:
            nonlocal count
            for (index, key), out in translate_images(net, multiple, sources(), device, batch_size, precision):
                out = quantize_to(out, target_fmt) if native else quantize(out)
                count += 1
                fake.add(index, out)
                bands_fake.add(out)
                if key in truth:
                    _paired(per_image, index, out, inputs[index], normalize(truth.pop(key)))
                yield index, out

        if reverse is not None:
            for index, rec in translate_images(reverse, multiple, translations(), device, batch_size, precision):
                per_image["cycle_l1"].append((index, paired.l1(rec[None], inputs.pop(index)[None]).item()))
        else:
            for index, _ in translations():
                inputs.pop(index)
    finally:
        for module, was_training in modes:
            module.train(was_training)

    # Counts and per-image scores (a few numbers per image) go to every rank; features do not (below).
    local = (count, real_count, per_image, bands_real, bands_fake)
    parts = dist.gather_objects(local) if share.world > 1 else [local]
    count, real_count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    bands_real, bands_fake = _BandStats.total(p[3] for p in parts), _BandStats.total(p[4] for p in parts)
    scores = {name: [v for _, v in sorted(item for p in parts for item in p[2][name])] for name in _PER_IMAGE}

    results: dict[str, float] = {"images": float(count), "real_images": float(real_count)}
    replicated = "_replicated" if isinstance(features, _Replicated) else ""
    if features is not None:
        if not known:
            real_set = real_set if real_set is not None else RealSet()
            real_set.moments, real_set.rows = _pooled(real_features, share, device)
        fake_moments, fake_rows = _pooled(fake.result(), share, device, len(real_set.moments.total))
        kid = _kid(fake_rows, real_set.rows, kid_subsets, kid_subset_size) if fake_rows is not None else None
        results["real_images"] = float(real_set.moments.count)
        results["fid" + replicated] = distribution.fid_of_moments(fake_moments, real_set.moments)
        kid = dist.broadcast_from_main(kid) if share.world > 1 else kid
        results.update({(k.replace("kid", "kid" + replicated, 1)): v for k, v in kid.items()})
    if paired_keys:
        pairs = len(scores["l1"])
        if not pairs:
            raise DataError(f"no sample keys are shared by '{source}' and '{target}': no pairs")
        results["pairs"] = float(pairs)
        for name in ("l1", "psnr", "ssim", "l1_identity", "psnr_identity", "ssim_identity"):
            results[name] = paired.mean_finite_aware(scores[name])
        if native and not target_fmt.per_image:
            low, high = target_fmt.window()
            results["l1_units"] = results["l1"] * (high - low) / 2
            results["l1_units_identity"] = results["l1_identity"] * (high - low) / 2
    if reverse is not None:
        results["cycle_l1"] = sum(scores["cycle_l1"]) / max(len(scores["cycle_l1"]), 1)
    if native:
        results.update(bands_fake.summary(target_fmt, ""))
        results.update(bands_real.summary(target_fmt, "_real"))
    return results


class _Replicated(nn.Module):
    """A 3-channel feature extractor fed 1-channel images replicated to 3 (FID of grayscale data, so labelled)."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x.expand(-1, 3, -1, -1))


class _BandStats:
    """Per-band count, sum and sum of squares of images in [-1, 1] (what per-band means and spreads need)."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: np.ndarray | None = None
        self.squares: np.ndarray | None = None

    def add(self, image: Tensor) -> None:
        x = image.double().flatten(1).cpu().numpy()
        self.count += x.shape[1]
        self.sums = x.sum(1) if self.sums is None else self.sums + x.sum(1)
        self.squares = (x * x).sum(1) if self.squares is None else self.squares + (x * x).sum(1)

    @classmethod
    def total(cls, parts: Iterator[_BandStats]) -> _BandStats:
        out = cls()
        for part in parts:
            if part.sums is None:
                continue
            out.count += part.count
            out.sums = part.sums if out.sums is None else out.sums + part.sums
            out.squares = part.squares if out.squares is None else out.squares + part.squares
        return out

    def summary(self, fmt: PixelFormat, suffix: str) -> dict[str, float]:
        """band<i>_mean<suffix> and band<i>_std<suffix>, in stored units (in [-1, 1] for per-image windows)."""
        if self.sums is None or not self.count:
            return {}
        mean = self.sums / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean**2, 0))
        low, high = (-1.0, 1.0) if fmt.per_image else fmt.window()
        scale = (high - low) / 2
        out = {}
        for band, (m, sd) in enumerate(zip(mean, std)):
            out[f"band{band}_mean{suffix}"] = float((m + 1) * scale + low)
            out[f"band{band}_std{suffix}"] = float(sd * scale)
        return out


def _pooled(part: tuple[list[int], np.ndarray], share: Share, device: torch.device,
            dim: int = 0) -> tuple[distribution.Moments, np.ndarray | None]:
    """A feature set's moments summed over ranks by an all-reduce (count, sum, sum of outer products: D^2 numbers
    per rank whatever the set's size), and its rows in the set's order on rank 0 only (None elsewhere), gathered
    there for KID, which needs the features themselves. One process: both from its own rows."""
    if share.world == 1:
        rows = _in_set_order([part])
        return distribution.Moments.of(rows, dim or rows.shape[1]), rows
    if not dim:  # A rank whose share is empty has no rows to tell the dimension: take the largest.
        dim = int(dist.all_reduce_max(torch.tensor([part[1].shape[1]], device=device)).item())
    mine = distribution.Moments.of(part[1], dim)
    flat = torch.from_numpy(np.concatenate([[mine.count], mine.total, mine.outer.ravel()]))
    flat = dist.all_reduce_sum(flat.to(device)).cpu().numpy()
    summed = distribution.Moments(int(round(flat[0])), flat[1 : 1 + dim], flat[1 + dim :].reshape(dim, dim))
    gathered = dist.gather_to_main(part)
    return summed, (_in_set_order(gathered) if gathered is not None else None)


def _kid(fake_rows: np.ndarray, real_rows: np.ndarray, subsets: int, subset_size: int) -> dict[str, float]:
    kid = distribution.kid(fake_rows, real_rows, subsets, subset_size)
    out = {"kid": kid.value, "kid_subset_size": float(kid.subset_size)}
    if kid.std is not None:
        out["kid_std"] = kid.std
    return out


_PER_IMAGE = ("l1", "psnr", "ssim", "l1_identity", "psnr_identity", "ssim_identity", "cycle_l1")


def _paired(per_image: dict[str, list[tuple[int, float]]], index: int, out: Tensor, source: Tensor,
            truth: Tensor) -> None:
    if truth.shape[-2:] != out.shape[-2:]:
        # Ground truth at another size (only with size=0): compare at the translation's size.
        if truth.shape[0] == 3:
            truth = to_tensor(to_image(truth).resize((out.shape[-1], out.shape[-2]), Image.BICUBIC))
        else:
            truth = resize_values(truth, out.shape[-2], out.shape[-1])
    if source.shape[0] != truth.shape[0]:
        # Another channel count (colourisation's gray input): the input as the target's channels, the baseline
        # to beat (a grayscale image replicated; a colour one's luminance).
        source = project_channels(source[None], truth.shape[0])[0]
    for suffix, image in (("", out), ("_identity", source)):
        if image.shape != truth.shape:
            continue
        x, y = image[None], truth[None]
        per_image["l1" + suffix].append((index, paired.l1(x, y).item()))
        per_image["psnr" + suffix].append((index, paired.psnr(x, y).item()))
        per_image["ssim" + suffix].append((index, paired.ssim(x, y).item()))


# Periodic evaluation during training.

_EXTRACTORS: dict[tuple[str, str], nn.Module] = {}


def cached_extractor(path: str, device: torch.device) -> nn.Module:
    """The extractor of a weight file, loaded once per process and device."""
    key = (str(path), str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = load_extractor(path, device)
    return _EXTRACTORS[key]


def held_out_eval(translators: dict[str, nn.Module], cfg: Any, device: torch.device) -> dict[str, float]:
    """What training evaluates every `eval.every_steps` and at the end, on data.test_a / data.test_b.

    `translators`: direction -> generator (CycleGAN: AtoB and BtoA; CUT: AtoB only).

    Always: the cycle error of both directions (where both generators exist). With `eval.paired`:
    per-direction L1/PSNR/SSIM against the ground truth (of the 8-bit translations, the one paired L1 of this
    code) next to the input's. With `eval.features`: FID and KID of each direction. Keys: `AtoB/fid`,
    `AtoB/l1`, `BtoA/cycle_l1`, ...
    """
    data, size = cfg.data, cfg.data.crop_size
    out: dict[str, float] = {}
    features = cached_extractor(cfg.eval.features, device) if cfg.eval.features else None
    multiple = required_multiple(cfg.model.generator)
    share = Share.of_process_group()  # Every rank its share; the gathered result is the same on all of them.
    sets = {"AtoB": (data.test_a, data.test_b), "BtoA": (data.test_b, data.test_a)}
    formats = formats_from(cfg)
    for direction, net in translators.items():
        source, target = sets[direction]
        reverse = translators.get("BtoA" if direction == "AtoB" else "AtoB")
        real_set, kept = _real_set(cfg, target, share) if features is not None else (None, None)
        fresh = real_set is not None and not real_set.ready
        pair = (formats["A"], formats["B"]) if direction == "AtoB" else (formats["B"], formats["A"])
        result = evaluate_direction(net, reverse, multiple, source, target, device, features, size,
                                    paired_keys=cfg.eval.paired, batch_size=cfg.eval.batch_size, share=share,
                                    real_set=real_set, formats=pair)
        if fresh:
            _save_real_set(real_set, kept, target, share)
        out.update({f"{direction}/{k}": v for k, v in result.items() if k not in ("images", "real_images")})
    return out


# The real sets' features of this process's runs: (run_dir, target, extractor, size) -> RealSet.
_REAL_SETS: dict[tuple[str, ...], RealSet] = {}


def _real_set_file(cfg: Any, target: str) -> tuple[tuple[str, ...], Path]:
    """The key of a real set's features and the file that keeps them in the run directory: the set, the
    extractor file (its path, size and time) and the resolution name them."""
    weights = Path(cfg.eval.features)
    stat = weights.stat()
    key = (str(Path(cfg.run_dir).resolve()), target, _fingerprint(target), str(weights.resolve()),
           str(stat.st_size), str(stat.st_mtime_ns), str(cfg.data.crop_size))
    digest = hashlib.sha256("\n".join(key[1:]).encode()).hexdigest()[:16]
    return key, Path(cfg.run_dir) / "eval-cache" / f"real-{digest}.npz"


@functools.lru_cache(maxsize=16)
def _fingerprint(target: str) -> str:
    """The local files of a held-out set, by name, size and time (once per process): a set replaced between two
    runs on one run directory is embedded again. URLs stand for themselves."""
    path = Path(target)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = [Path(local_path(url)) for url in expand_pattern(target) if local_path(url) is not None]
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]


def _real_set(cfg: Any, target: str, share: Share) -> tuple[RealSet, Path]:
    """The real set's features and the file that keeps them: from this process's memory, else from the run
    directory (a resumed run), else an empty RealSet that the evaluation fills. Rank 0 alone loads the rows
    (KID is computed there)."""
    key, path = _real_set_file(cfg, target)
    if key not in _REAL_SETS:
        real_set = RealSet()
        if path.is_file():
            with np.load(path) as saved:
                real_set.moments = distribution.Moments(int(saved["count"]), saved["total"], saved["outer"])
                real_set.rows = saved["rows"] if share.rank == 0 else None
            log.info("real-set features of %s read from %s", target, path)
        _REAL_SETS[key] = real_set
    return _REAL_SETS[key], path


def _save_real_set(real_set: RealSet, path: Path, target: str, share: Share) -> None:
    """Rank 0 keeps a real set's features in the run directory, for the evaluations after a resume."""
    if real_set.moments is None:
        return
    log.info("real-set features of %s computed (%d images); kept in %s", target, real_set.moments.count, path)
    if share.rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, count=real_set.moments.count, total=real_set.moments.total, outer=real_set.moments.outer,
             rows=real_set.rows)
    tmp.replace(path)
