"""A domain's pixel statistics: the mean and covariance of its channels over a sample of its training images.

What a colour transfer between two domains is fitted from (`pipeline.gan.colour.colour_transfer`). The images
come from streams of their own, so reading them leaves the training streams, their state and resume untouched;
every rank reads the same images and gets the same figures without communicating.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from pipeline.data.images import normalize
from pipeline.data.pixels import PixelFormat
from pipeline.data.stream import Augment, DataError, DomainMismatch, DomainStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PixelMoments:
    """Mean (C,) and covariance (C, C) of a domain's pixels in the networks' [-1, 1] units, float64, and how many
    images and pixels they were taken over."""

    mean: torch.Tensor
    covariance: torch.Tensor
    images: int
    pixels: int


def pixel_moments(urls: list[str], augment: Augment, fmt: PixelFormat, images: int, label: str = "",
                  retry_s: float = 120.0) -> PixelMoments:
    """The moments of about `images` images (decoded and cropped as training's are), spread over the shards.

    Shards are often written in an order (by scene, by date): the first images of the first shard would describe
    one corner of the domain. So the images are the first few of each of up to `images` shards spaced evenly
    through the list, each shard read once from its start; a domain with fewer images gives them all.

    Args:
        urls: the domain's shards, as training expanded them.
        augment, fmt: how training decodes, crops and converts the domain's images.
        images: how many images to take.
        label: the domain as errors and warnings name it.
        retry_s: how long a network shard may fail in a row before it counts as unreadable.

    Raises:
        DomainMismatch: an image the domain's settings cannot take (as training would).
        DataError: no sampled shard gave an image, or the images hold non-finite values.
    """
    chosen = [urls[i * len(urls) // min(images, len(urls))] for i in range(min(images, len(urls)))]
    per_shard = math.ceil(images / len(chosen))
    total = torch.zeros(fmt.channels, dtype=torch.float64)
    outer = torch.zeros(fmt.channels, fmt.channels, dtype=torch.float64)
    count, pixels = 0, 0
    failed: list[DataError] = []
    for index, url in enumerate(chosen):
        # A buffer of one reads the shard in order.
        stream = DomainStream([url], f"colour-moments:{index}", augment, shuffle_buffer=1, label=label,
                              retry_s=retry_s, report=False, fmt=fmt)
        try:  # A shard counts whole or not at all.
            shard_total, shard_outer, shard_count, shard_pixels = _sums(stream, min(per_shard, images - count))
        except DomainMismatch:
            raise
        except DataError as err:  # A shard training would skip: the others describe the domain.
            log.warning("%s: colour statistics without shard %s (%s)", label or "a domain", url, err)
            failed.append(err)
            continue
        total += shard_total
        outer += shard_outer
        count += shard_count
        pixels += shard_pixels
        if count == images:
            break
    if count == 0:
        raise DataError(f"{label or 'a domain'}: model.colour_start=transfer found no readable image in the "
                        f"{len(chosen)} shard(s) it sampled for the domain's colour statistics (the first: "
                        f"{failed[0]}). Fix the shards, or set model.colour_start=identity") from failed[0]
    mean = total / pixels
    # Second moment minus the mean's outer product, symmetrised against rounding.
    covariance = outer / pixels - torch.outer(mean, mean)
    if not (torch.isfinite(mean).all() and torch.isfinite(covariance).all()):
        raise DataError(f"{label or 'a domain'}: its images hold non-finite values (NaN or infinity), so its colour "
                        "statistics are not numbers: clean the files, or set model.colour_start=identity")
    return PixelMoments(mean, (covariance + covariance.T) / 2, count, pixels)


def _sums(stream: DomainStream, limit: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Sum and sum of outer products of the pixels of the stream's first `limit` images (fewer when its first pass
    ends sooner: a stream with a buffer of one has its only pass end when the next one starts), the images and the
    pixels counted."""
    total = torch.zeros(stream.fmt.channels, dtype=torch.float64)
    outer = torch.zeros(stream.fmt.channels, stream.fmt.channels, dtype=torch.float64)
    count, pixels = 0, 0
    for image in stream.iterate():
        values = normalize(image).to(torch.float64).flatten(1)  # (C, pixels)
        total += values.sum(1)
        outer += values @ values.T
        count += 1
        pixels += values.shape[1]
        if count == limit or stream.samples.passes > 0:
            break
    return total, outer, count, pixels
