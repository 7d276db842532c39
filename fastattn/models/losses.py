"""Hinge loss (SAGAN, BigGAN) and the discriminator's accuracy, for logging."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["hinge_loss_d", "hinge_loss_g", "d_accuracy"]


def hinge_loss_d(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


def hinge_loss_g(d_fake: Tensor) -> Tensor:
    """-E[D(G(z))]."""
    return -d_fake.mean()


def d_accuracy(d_real: Tensor, d_fake: Tensor) -> float:
    """Fraction of real logits > 0 and fake logits < 0, together."""
    hits = (d_real > 0).sum() + (d_fake < 0).sum()
    return float(hits) / (d_real.numel() + d_fake.numel())
