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
    """uint8 images -> float32 in [-1, 1], on whatever device the batch is on (the accelerator, in training)."""
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
