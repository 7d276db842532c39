"""A cheap, dependency-free measure of whether samples approach the data: the Frechet distance
between Gaussians fitted to 8x8 average-pooled RGB images (192 features), "FD8".

It is FID's formula on raw downsampled pixels instead of Inception features: it sees colour,
coarse layout and how much of the image a shape covers, which is what the generated shapes
dataset varies, and it needs no pretrained network (nothing can be downloaded here). Of the
data against itself it is ~0 (up to sampling noise); of an untrained generator it is large.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pooled_features", "frechet_distance", "fd8"]

FEATURE_SIDE = 8


def pooled_features(images: Tensor) -> Tensor:
    """(B, 3, R, R) -> (B, 3 * 8 * 8) in fp64."""
    return F.adaptive_avg_pool2d(images.detach().to(torch.float64), FEATURE_SIDE).flatten(1)


def _stats(features: Tensor) -> tuple[Tensor, Tensor]:
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / max(1, features.shape[0] - 1)


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two (n, d) feature sets."""
    mu_a, cov_a = _stats(a)
    mu_b, cov_b = _stats(b)
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value.clamp_min(0))


def fd8(samples: Tensor, data_features: Tensor) -> float:
    """FD8 of generated images against precomputed `pooled_features` of the data."""
    return frechet_distance(pooled_features(samples), data_features)
