"""What a stream leaves out, and why: shards that cannot be read, samples that are not usable images.

Real folders hold interrupted copies, stray files and images nobody meant to train on. None of them stops a run:
each is skipped, the first of each kind with a warning that names it, and every first pass ends with one warning
that counts them all. A domain left with nothing usable stops the run with an error that lists what was skipped.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter, defaultdict
from typing import Any

from PIL import Image

from pipeline.data.pixels import NATIVE_KEYS, PixelError, PixelFormat, png_bit_depth

log = logging.getLogger("pipeline.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# Modes PIL opens 16-bit and 32-bit data in: converting them to 8-bit RGB clips (a 16-bit PNG becomes white).
WIDE_MODES = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}

# PIL's own default (Image.MAX_IMAGE_PIXELS): about 89 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485


def image_member(sample: dict[str, Any]) -> str | None:
    """The key of the sample's image member (first of jpg/jpeg/png/webp), or None."""
    return next((key for key in IMAGE_KEYS if key in sample), None)


def unusable(sample: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS,
             fmt: PixelFormat | None = None) -> str | None:
    """Why a sample cannot be trained on, from its image's header (no pixels decoded), or None if it can.

    `max_pixels` (data.max_image_pixels; 0: no limit) refuses decompression bombs: a few kilobytes that decode
    to gigabytes. `fmt`: the domain's pixel format (8-bit RGB when None); other formats also take tif/tiff/npy
    members, whose headers are read when they are decoded.

    Raises:
        PixelError: a 16- or 32-bit image in an 8-bit domain (reading it would clip it): the message names the
            image, its mode and the setting to change.
    """
    fmt = fmt or PixelFormat()
    keys = IMAGE_KEYS if fmt.is_8bit_rgb else NATIVE_KEYS
    key = next((k for k in keys if k in sample), None)
    if key is None:
        members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
        return f"no image member ({'/'.join(keys)}; it has: {members})"
    if key in ("tif", "tiff", "npy"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(sample[key]))
    except Image.DecompressionBombError:
        return (f"too large to decode safely (over data.max_image_pixels={max_pixels:,} pixels: a decompression "
                "bomb, or raise the limit if the image is genuine)")
    except Image.UnidentifiedImageError:
        return f"not an image (its {key} member is in no format PIL can read)"
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bytes that are not an image
        return f"not an image ({type(err).__name__}: {err})"
    width, height = img.size
    if max_pixels and width * height > max_pixels:
        return (f"too large to decode safely ({width}x{height} = {width * height:,} pixels, over "
                f"data.max_image_pixels={max_pixels:,}: raise it if the image is genuine)")
    bits = WIDE_MODES.get(img.mode) or (16 if key == "png" and png_bit_depth(sample[key]) == 16 else 0)
    if bits and fmt.depth == "uint8":
        raise PixelError(
            f"{name_of(sample)}: a {bits}-bit image ({key.upper()} mode {img.mode}) in an 8-bit domain, which "
            f"would clip it: set {fmt.key}.depth={'uint16' if bits == 16 else 'float32'} and {fmt.key}.intensity "
            f"(and {fmt.channels_key}=1 for grayscale), or convert the set to 8 bits")
    return None


def name_of(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__')}:{sample.get('__key__')}"


class Skips:
    """One stream's skipped shards and samples. `report` is false for all but one stream of a kind per job (rank 0,
    worker 0), so a bad shard is not reported by every worker of every rank."""

    def __init__(self, label: str, report: bool = True) -> None:
        self.label = label or "a domain"
        self.report = report
        self.shards: dict[str, str] = {}
        self.samples: dict[str, list[str]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.conversions: Counter[str] = Counter()
        self.first_pass = 0
        """Usable samples of the first pass, once it has ended."""

    def shard(self, url: str, reason: str, delivered: int = 0) -> None:
        if url in self.shards:
            return
        self.shards[url] = reason
        if self.report:
            after = f" after {delivered} sample(s)" if delivered else ""
            log.warning("%s: skipping shard %s%s: %s (%d shard(s) skipped so far; check it with `python -m "
                        "pipeline.shards inspect %s`)", self.label, url, after, reason, len(self.shards), url)

    def sample(self, name: str, reason: str) -> None:
        kind = reason.split(" (")[0]
        self.counts[kind] += 1
        if len(self.samples[kind]) < 5:
            self.samples[kind].append(name)
        if self.report and self.counts[kind] == 1:
            log.warning("%s: skipping sample %s: %s (further ones are counted at the end of the pass)",
                        self.label, name, reason)

    def converted(self, name: str, kind: str) -> None:
        """A sample used after converting it to the domain's channels or depth (data.domain_*.mismatch)."""
        self.conversions[kind] += 1
        if self.report and self.conversions[kind] == 1:
            log.warning("%s: converting %s: %s (further ones are counted at the end of the pass; "
                        "data.domain_*.mismatch=error refuses them)", self.label, name, kind)

    def describe(self) -> str:
        parts = []
        if self.shards:
            named = ", ".join(f"{url} ({why})" for url, why in list(self.shards.items())[:5])
            parts.append(f"{len(self.shards)} shard(s) skipped: {named}")
        for kind, count in self.counts.items():
            named = ", ".join(self.samples[kind]) + (" ..." if count > len(self.samples[kind]) else "")
            parts.append(f"{count} sample(s) skipped as {kind}: {named}")
        return "; ".join(parts)

    def end_of_first_pass(self, produced: int) -> None:
        self.first_pass = produced
        if self.report and (self.shards or self.counts):
            log.warning("%s: its first pass read %d usable sample(s); %s", self.label, produced, self.describe())
        if self.report and self.conversions:
            log.warning("%s: by the end of its first pass %s were converted", self.label,
                        "; ".join(f"{count} sample(s) of {kind}" for kind, count in self.conversions.items()))
