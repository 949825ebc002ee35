"""Sample grids from a fixed held-out batch: rows of real_a | fake_b | rec_a, then real_b | fake_a | rec_b."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.data.images import to_uint8
from pipeline.gan.cyclegan import Generators


def _nhwc_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return to_uint8(images.detach().float()).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_grid(gens: Generators, real_a: Tensor, real_b: Tensor) -> np.ndarray:
    """One image: a row per held-out sample, A rows first, with 2-pixel white gutters."""
    was_training = gens.training
    gens.eval()
    try:
        fake_b = gens.G_ab(real_a)
        rec_a = gens.G_ba(fake_b)
        fake_a = gens.G_ba(real_b)
        rec_b = gens.G_ab(fake_a)
    finally:
        gens.train(was_training)
    rows = [torch.cat(list(triple), dim=-1) for triple in zip(real_a, fake_b, rec_a)]
    rows += [torch.cat(list(triple), dim=-1) for triple in zip(real_b, fake_a, rec_b)]
    tiles = _nhwc_uint8(torch.stack(rows))
    gutter = 2
    n, h, w, _ = tiles.shape
    grid = np.full((n * (h + gutter) - gutter, w, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        grid[i * (h + gutter) : i * (h + gutter) + h] = tile
    return grid
