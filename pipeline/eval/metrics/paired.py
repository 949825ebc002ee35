"""Per-image errors against ground truth: L1, PSNR and SSIM of images in [-1, 1], batched on any device.

L1 is in [-1, 1] units (as the training losses); PSNR and SSIM treat images as [0, 1] with data range 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"need two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def l1(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute error per image, (N,), in [-1, 1] units."""
    _check(x, y)
    return (x.float() - y.float()).abs().mean(dim=(1, 2, 3))


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image in dB, (N,); inf for identical images."""
    _check(x, y)
    mse = ((x.double() - y.double()) / 2).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse)  # 1 / 0 = inf for identical images.


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _band(window: Tensor, n: int) -> Tensor:
    """(n - k + 1, n) matrix whose row i holds the k-tap window at columns i..i+k-1: valid 1-d filtering."""
    k = window.numel()
    band = torch.zeros(n - k + 1, n, dtype=window.dtype, device=window.device)
    for i in range(n - k + 1):
        band[i, i : i + k] = window
    return band


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> Tensor:
    """Structural similarity per image (Wang et al. 2004), (N,); 1 for identical images.

    The standard setting: an 11x11 Gaussian window of sigma 1.5, K1 0.01, K2 0.03, data range 1, statistics
    over the valid window positions only, averaged over positions and channels. This equals scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)`.
    Images smaller than the window use the largest odd window that fits.
    """
    _check(x, y)
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2
    x = (x.double() + 1) / 2
    y = (y.double() + 1) / 2
    g = _gaussian_window(size, sigma, x.device)
    rows, cols = _band(g, x.shape[-2]), _band(g, x.shape[-1])

    def blur(t: Tensor) -> Tensor:
        # Separable Gaussian at the valid positions, as two matrix products (depthwise convolutions with
        # 11-tap kernels are ~100x slower on CPU).
        return rows @ t @ cols.T

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def mean_finite_aware(values: list[float]) -> float:
    """Mean of per-image values; inf if any is inf (PSNR of an exact match)."""
    if not values:
        return math.nan
    return math.inf if any(math.isinf(v) for v in values) else sum(values) / len(values)
