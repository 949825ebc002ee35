"""Distances between two sets of image features: FID (Heusel et al. 2017) and KID (Binkowski et al. 2018).

Both take features from any extractor (`pipeline.eval.metrics.features`); published numbers use Inception-v3 pool3
features (2048-d). Arithmetic is float64 numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, N - 1) of (N, D) features, in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


class Moments(NamedTuple):
    """Sufficient statistics of a feature set for FID: count, sum and sum of outer products (float64). Ranks add
    theirs (an all-reduce of D + D^2 numbers: 33.6 MB for Inception's 2048) instead of gathering the features."""

    count: int
    total: np.ndarray
    outer: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray, dim: int) -> Moments:
        x = np.asarray(features, dtype=np.float64).reshape(-1, dim)
        return cls(x.shape[0], x.sum(axis=0), x.T @ x)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance: (sum xx^T - n mu mu^T) / (n - 1)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.count}")
        mu = self.total / self.count
        return mu, (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def fid_of_moments(fake: Moments, real: Moments) -> float:
    return frechet_distance(*fake.stats(), *real.stats())


def _nonnegligible(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those at round-off level set to 0.

    A covariance of fewer samples than dimensions is singular: its null-space eigenvalues come out of eigh as
    +-n eps max|lambda|, and sqrt of a positive one (~3e-8 for 1e-15) would add noise whose sign pattern depends
    on the LAPACK build and CPU. Below that level an eigenvalue is 0.
    """
    cutoff = len(eigenvalues) * np.finfo(np.float64).eps * max(float(np.abs(eigenvalues).max(initial=0.0)), 1e-300)
    return np.where(eigenvalues > cutoff, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (round-off eigenvalues are 0)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_nonnegligible(eigenvalues))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1),
    a symmetric PSD matrix with the same eigenvalues as S1 S2. Unlike a general matrix square root of the
    non-symmetric S1 S2 (scipy.linalg.sqrtm, as pytorch-fid uses), this has no complex parts to discard and
    stays accurate for the singular covariances of sets smaller than the feature dimension.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(_nonnegligible(eigenvalues)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(value, 0.0))  # Round-off can leave -1e-12 for identical sets.


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / D + 1)^3 (sets of any sizes >= 2)."""
    m, dim = x.shape
    n = y.shape[0]
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    # Diagonal terms k(x_i, x_i) are left out of the within-set means: that makes the estimate unbiased.
    within = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within - 2 * k_xy.mean())


class KID(NamedTuple):
    value: float
    """Mean MMD^2 over the subsets, or the MMD^2 of the whole sets."""
    std: float | None
    """Standard deviation over the subsets; None for whole sets (one estimate has no spread)."""
    subset_size: int
    """Vectors per subset and set; 0 when the whole sets were used."""
    subsets: int
    """Subsets averaged (1 for whole sets)."""


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> KID:
    """KID: the unbiased polynomial-kernel MMD^2, averaged over random subsets as torch-fidelity and StyleGAN's
    metrics do, with its spread.

    Each subset draws `subset_size` vectors without replacement from each set. When a set has no more vectors
    than `subset_size`, every subset would be that whole set, in another order: the spread would be round-off
    (printed as 0.0000) and the mean would depend on `subsets` in its last bits. Then the MMD^2 of the whole
    sets is returned, once, with no spread (`std` None). Unbiased: about 0 for two samples of one
    distribution, negative values included.

    Args:
        features1, features2: (N1, D) and (N2, D) features.
        subsets: number of subsets averaged.
        subset_size: vectors per subset and set.
        seed: seed of the subset draws.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if min(len(x), len(y)) < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(x)} and {len(y)}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs at least 1 subset of at least 2 vectors, got {subsets} of {subset_size}")
    if min(len(x), len(y)) <= subset_size:
        return KID(_poly_mmd2(x, y), None, 0, 1)
    rng = np.random.default_rng(seed)
    values = np.array([
        _poly_mmd2(x[rng.choice(len(x), subset_size, replace=False)], y[rng.choice(len(y), subset_size, replace=False)])
        for _ in range(subsets)
    ])
    return KID(float(values.mean()), float(values.std()), subset_size, subsets)
