"""Held-out evaluation of a pair of generators: FID/KID, paired L1/PSNR/SSIM and cycle error per direction.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.data.held_out import iter_selected, lazy_inputs
from pipeline.data.images import normalize, quantize, to_image, to_tensor, to_uint8
from pipeline.data.stream import DataError
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
    share: Share = Share(),
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

    Returns:
        `images` and `real_images` (counts); `fid`, `kid`, `kid_subset_size` (0: whole sets) and `kid_std`
        (only over subsets smaller than the sets: see `distribution.kid`) with `features`; `pairs`, `l1`, `psnr`,
        `ssim` and the same of the untranslated input (`*_identity`) when paired; `cycle_l1` with `reverse`.
    """
    modes = [(m, m.training) for m in (net, reverse, features) if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        # This share's sources; with pairs, their keys first (one pass over the source set), so that each rank
        # keeps only its own ground truth.
        # Keys cost no decoding: every image is decoded by the one rank that uses it, whatever the world size.
        source_keys = ([item.key for item in itertools.islice(lazy_inputs(source), max_images or None)]
                       if paired_keys else [])
        mine = {key for i, key in enumerate(source_keys) if share.takes(i)}

        # Real target images: features of this share, and the ground truth of this share's sources (8-bit).
        real = _Features(features, device, batch_size)
        truth: dict[str, Tensor] = {}
        real_count = 0
        if paired_keys and max_images:
            # The ground truth of the first max_images sources, not the first max_images of the target set:
            # shards hold their files in a shuffled order, so those would not pair.
            keys = set(source_keys)
            targets = iter_selected(target, size, 0, lambda i, key: key in keys and (share.takes(i) or key in mine))
        else:
            targets = iter_selected(target, size, max_images, lambda i, key: share.takes(i) or key in mine)
        for index, key, image in targets:
            if share.takes(index):
                real_count += 1
                real.add(index, image)
            if key in mine:
                truth[key] = to_uint8(image)
        real_features = real.result()

        # Translate, and run the reverse generator on the translations as they come (bounded memory).
        fake = _Features(features, device, batch_size)
        inputs: dict[int, Tensor] = {}
        per_image: dict[str, list[tuple[int, float]]] = {k: [] for k in _PER_IMAGE}
        count = 0

        def sources() -> Iterator[tuple[tuple[int, str], Tensor]]:
            for index, key, image in iter_selected(source, size, max_images, lambda i, key: share.takes(i)):
                inputs[index] = image
                yield (index, key), image

        def translations() -> Iterator[tuple[int, Tensor]]:
            nonlocal count
            for (index, key), out in translate_images(net, multiple, sources(), device, batch_size, precision):
                out = quantize(out)
                count += 1
                fake.add(index, out)
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
    local = (count, real_count, per_image)
    parts = dist.gather_objects(local) if share.world > 1 else [local]
    count, real_count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    scores = {name: [v for _, v in sorted(item for p in parts for item in p[2][name])] for name in _PER_IMAGE}

    results: dict[str, float] = {"images": float(count), "real_images": float(real_count)}
    if features is not None:
        results.update(_distribution_metrics(fake.result(), real_features, share, device, kid_subsets,
                                             kid_subset_size))
    if paired_keys:
        pairs = len(scores["l1"])
        if not pairs:
            raise DataError(f"no sample keys are shared by '{source}' and '{target}': no pairs")
        results["pairs"] = float(pairs)
        for name in ("l1", "psnr", "ssim", "l1_identity", "psnr_identity", "ssim_identity"):
            results[name] = paired.mean_finite_aware(scores[name])
    if reverse is not None:
        results["cycle_l1"] = sum(scores["cycle_l1"]) / max(len(scores["cycle_l1"]), 1)
    return results


def _distribution_metrics(fake: tuple[list[int], np.ndarray], real: tuple[list[int], np.ndarray], share: Share,
                          device: torch.device, kid_subsets: int, kid_subset_size: int) -> dict[str, float]:
    """FID from the sets' moments, summed over ranks by an all-reduce (count, sum, sum of outer products: a rank
    holds D^2 numbers per set whatever the set's size); KID, which needs the features themselves, computed on
    rank 0 from features gathered there only, and its numbers broadcast. One process: the same from its rows."""
    if share.world == 1:
        fake_rows, real_rows = _in_set_order([fake]), _in_set_order([real])
        dim = fake_rows.shape[1]
        fid = distribution.fid_of_moments(distribution.Moments.of(fake_rows, dim),
                                          distribution.Moments.of(real_rows, dim))
        return {"fid": fid, **_kid(fake_rows, real_rows, kid_subsets, kid_subset_size)}
    # A rank whose share is empty has no rows to tell the dimension: take the largest.
    dim = int(dist.all_reduce_max(torch.tensor([max(fake[1].shape[1], real[1].shape[1])], device=device)).item())
    moments = [distribution.Moments.of(rows[1], dim) for rows in (fake, real)]
    flat = torch.from_numpy(np.concatenate([np.concatenate([[m.count], m.total, m.outer.ravel()]) for m in moments]))
    flat = dist.all_reduce_sum(flat.to(device)).cpu().numpy()
    size = 1 + dim + dim * dim
    summed = [distribution.Moments(int(round(part[0])), part[1 : 1 + dim], part[1 + dim :].reshape(dim, dim))
              for part in (flat[:size], flat[size:])]
    gathered = dist.gather_to_main((fake, real))
    kid = None
    if gathered is not None:
        kid = _kid(_in_set_order([g[0] for g in gathered]), _in_set_order([g[1] for g in gathered]), kid_subsets,
                   kid_subset_size)
    return {"fid": distribution.fid_of_moments(*summed), **dist.broadcast_from_main(kid)}


def _kid(fake_rows: np.ndarray, real_rows: np.ndarray, subsets: int, subset_size: int) -> dict[str, float]:
    kid = distribution.kid(fake_rows, real_rows, subsets, subset_size)
    out = {"kid": kid.value, "kid_subset_size": float(kid.subset_size)}
    if kid.std is not None:
        out["kid_std"] = kid.std
    return out


_PER_IMAGE = ("l1", "psnr", "ssim", "l1_identity", "psnr_identity", "ssim_identity", "cycle_l1")


def _paired(per_image: dict[str, list[tuple[int, float]]], index: int, out: Tensor, source: Tensor,
            truth: Tensor) -> None:
    if truth.shape != out.shape:
        # Ground truth at another size (only with size=0): compare at the translation's size.
        truth = to_tensor(to_image(truth).resize((out.shape[-1], out.shape[-2]), Image.BICUBIC))
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
    for direction, net in translators.items():
        source, target = sets[direction]
        reverse = translators.get("BtoA" if direction == "AtoB" else "AtoB")
        result = evaluate_direction(net, reverse, multiple, source, target, device, features, size,
                                    paired_keys=cfg.eval.paired, batch_size=cfg.eval.batch_size, share=share)
        out.update({f"{direction}/{k}": v for k, v in result.items() if k not in ("images", "real_images")})
    return out
