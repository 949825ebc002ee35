"""Sample grids from a fixed held-out batch. CycleGAN: rows of real_a | fake_b | rec_a, then real_b | fake_a |
rec_b. CUT (one generator): rows of real_a | fake_b | real_b | idt_b (G's output on a B image: what identity
NCE keeps unchanged)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.data.images import display_rgb, project_channels, to_uint8


def _nhwc_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return to_uint8(images.detach().float()).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_grid(translators: dict[str, nn.Module], real_a: Tensor, real_b: Tensor,
                seen: Callable[[Tensor, Tensor], None] | None = None,
                bands: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())) -> np.ndarray:
    """One image: a row per held-out sample (A rows first for CycleGAN), with 2-pixel white gutters.

    `translators`: direction -> generator (AtoB and BtoA for CycleGAN, AtoB only for CUT). `seen(real_a, fake_b)`
    is told the A images and their translations (the training-health check looks at them). Images of 1 channel
    are shown as grayscale, of other band counts through `bands` (A's, B's: data.domain_*.bands), in the window
    their intensity mapping uses."""
    show_a, show_b = (lambda x: display_rgb(x, bands[0])), (lambda x: display_rgb(x, bands[1]))
    nets = list(translators.values())
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    try:
        g_ab, g_ba = translators["AtoB"], translators.get("BtoA")
        if g_ba is not None:
            fake_b = g_ab(real_a)
            rec_a = g_ba(fake_b)
            fake_a = g_ba(real_b)
            rec_b = g_ab(fake_a)
            rows = [torch.cat(list(triple), dim=-1)
                    for triple in zip(show_a(real_a), show_b(fake_b), show_a(rec_a))]
            if seen is not None:
                seen(real_a, fake_b)
            rows += [torch.cat(list(triple), dim=-1)
                     for triple in zip(show_b(real_b), show_a(fake_a), show_b(rec_b))]
        else:
            n = min(len(real_a), len(real_b))
            fake_b = g_ab(real_a[:n])
            idt_b = g_ab(project_channels(real_b[:n], real_a.shape[1]))
            rows = [torch.cat(list(four), dim=-1)
                    for four in zip(show_a(real_a[:n]), show_b(fake_b), show_b(real_b[:n]), show_b(idt_b))]
            if seen is not None:
                seen(real_a[:n], fake_b)
    finally:
        for net, mode in zip(nets, modes):
            net.train(mode)
    tiles = _nhwc_uint8(torch.stack(rows))
    gutter = 2
    n, h, w, _ = tiles.shape
    grid = np.full((n * (h + gutter) - gutter, w, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        grid[i * (h + gutter) : i * (h + gutter) + h] = tile
    return grid
