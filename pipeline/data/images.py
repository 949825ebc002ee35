"""Every conversion between 8-bit images and the [-1, 1] float tensors the networks see, in one place."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 CHW tensor: what workers send (4x less to copy than float32)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1], on whatever device the batch is on (the accelerator, in training).
    Float batches (other channel counts and depths: `pipeline.data.pixels`) are already mapped and pass."""
    if batch.dtype != torch.uint8:
        return batch.float()
    return batch.float().div_(127.5).sub_(1.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 CHW tensor in [-1, 1]."""
    array = np.array(img, dtype=np.uint8)  # A writable copy: torch warns on read-only arrays.
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 of the same shape: the 256 levels an 8-bit file holds (clamped, rounded)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte()


def to_image(translation: Tensor) -> Image.Image:
    """(3, h, w) in [-1, 1] -> RGB PIL image (rounded to 8 bits)."""
    return Image.fromarray(to_uint8(translation).permute(1, 2, 0).numpy())


def quantize(x: Tensor) -> Tensor:
    """Round [-1, 1] images to the 256 levels an 8-bit file holds, staying in [-1, 1]."""
    return normalize(to_uint8(x))


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """The reference's test transform: resize to size x size (bicubic)."""
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


def resize_values(x: Tensor, height: int, width: int | None = None) -> Tensor:
    """A (C, H, W) float image in [-1, 1] resized to height x width (width: height) by antialiased bicubic
    interpolation of its values (no 8-bit step: 16-bit and float data keep their precision), clamped to [-1, 1]."""
    width = height if width is None else width
    if tuple(x.shape[-2:]) == (height, width):
        return x
    out = torch.nn.functional.interpolate(x[None], size=(height, width), mode="bicubic", align_corners=False,
                                          antialias=True)
    return out[0].clamp_(-1.0, 1.0)


def project_channels(x: Tensor, channels: int) -> Tensor:
    """(N, C, H, W) images as `channels` channels: unchanged when C equals it; a 1-channel image repeated; else the
    luminance (BT.601 weights for RGB, the mean of other band counts), repeated if more than one is asked.
    How CUT's encoder sees B images when the domains' channel counts differ."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return x.expand(-1, channels, -1, -1)
    if have == 3:
        luma = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    else:
        luma = x.mean(1, keepdim=True)
    return luma if channels == 1 else luma.expand(-1, channels, -1, -1)


def display_rgb(x: Tensor, bands: tuple[int, ...] = ()) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, 3, H, W) to look at: RGB as it is, one channel as grayscale, other band
    counts through `bands` (three shown as RGB, or one as grayscale; default: the first three, or the first)."""
    chosen = bands or ((0, 1, 2) if x.shape[1] >= 3 else (0,))
    x = x[:, list(chosen)]
    return x if x.shape[1] == 3 else x[:, :1].expand(-1, 3, -1, -1)
