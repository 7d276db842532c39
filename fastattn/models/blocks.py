"""Building blocks of the reference attention GAN: spectral norm, conditional batch norm,
BigGAN-style residual up (generator) and down (discriminator) blocks, and the attention layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = [
    "ATTENTION_CHOICES",
    "ConditionalBatchNorm2d",
    "DBlock",
    "GBlock",
    "attention_layers",
    "make_attention",
    "sn",
]

ATTENTION_CHOICES = ("naive", "fastattn")

# Spectral-norm eps of StudioGAN's layers (../shared/GAN_LAYERS.md); torch's default is 1e-12.
SN_EPS = 1e-6


def sn(module: nn.Module, enabled: bool = True) -> nn.Module:
    """`module` with spectral normalisation of its weight (torch parametrization) when enabled."""
    return _spectral_norm(module, eps=SN_EPS) if enabled else module


def make_attention(channels: int, *, pool: bool, attention: str, backend: str | None,
                   spectral_norm: bool) -> nn.Module:
    """The fastattn drop-in self-attention layer in the SAGAN/BigGAN layout: d_qk = C/8,
    d_v = C/2 with 2x2 max-pooled keys/values (BigGAN, StudioGAN) or C without (SAGAN), a 1x1
    output conv and a residual scale gamma that starts at 0."""
    from ..nn import SelfAttention2d

    return SelfAttention2d(
        channels,
        qk_channels=max(1, channels // 8),
        v_channels=max(1, channels // 2) if pool else channels,
        pool=pool,
        out_conv=True,
        bias=False,
        spectral_norm=spectral_norm,
        attention=attention,
        backend=backend,
        sn_eps=SN_EPS,
    )


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention layers inside `model`, in module order."""
    from ..nn import SelfAttention2d

    return [m for m in model.modules() if isinstance(m, SelfAttention2d)]


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose gain and bias come from the class label (SAGAN/BigGAN generators).

    With n_classes == 0 it is a plain affine BatchNorm2d and the label is ignored.
    """

    def __init__(self, num_features: int, n_classes: int = 0):
        super().__init__()
        self.n_classes = n_classes
        self.bn = nn.BatchNorm2d(num_features, affine=n_classes == 0)
        if n_classes:
            self.gain = nn.Embedding(n_classes, num_features)
            self.bias = nn.Embedding(n_classes, num_features)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.bn(x)
        if not self.n_classes:
            return out
        return out * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class GBlock(nn.Module):
    """Generator residual block: BN-ReLU-up-conv3x3-BN-ReLU-conv3x3, shortcut up-conv1x1."""

    def __init__(self, in_channels: int, out_channels: int, *, n_classes: int = 0,
                 spectral_norm: bool = True):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_channels, n_classes)
        self.conv1 = sn(nn.Conv2d(in_channels, out_channels, 3, padding=1), spectral_norm)
        self.bn2 = ConditionalBatchNorm2d(out_channels, n_classes)
        self.conv2 = sn(nn.Conv2d(out_channels, out_channels, 3, padding=1), spectral_norm)
        self.shortcut = sn(nn.Conv2d(in_channels, out_channels, 1), spectral_norm)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """Discriminator residual block: (ReLU)-conv3x3-ReLU-conv3x3-(avgpool), shortcut
    conv1x1-(avgpool). The first block takes the image and has no leading ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, preactivation: bool = True,
                 downsample: bool = True, spectral_norm: bool = True):
        super().__init__()
        self.preactivation, self.downsample = preactivation, downsample
        self.conv1 = sn(nn.Conv2d(in_channels, out_channels, 3, padding=1), spectral_norm)
        self.conv2 = sn(nn.Conv2d(out_channels, out_channels, 3, padding=1), spectral_norm)
        self.learnable_shortcut = in_channels != out_channels or downsample
        if self.learnable_shortcut:
            self.shortcut = sn(nn.Conv2d(in_channels, out_channels, 1), spectral_norm)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.learnable_shortcut:
            if self.preactivation:
                s = self.shortcut(s)
                s = F.avg_pool2d(s, 2) if self.downsample else s
            else:  # on the raw image: pool first, as BigGAN's first block does
                s = F.avg_pool2d(s, 2) if self.downsample else s
                s = self.shortcut(s)
        return h + s
