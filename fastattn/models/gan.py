"""The reference attention GAN: a SAGAN/BigGAN-style generator and projection discriminator.

Both are sized by arguments. Channel widths follow BigGAN's schedule (ch x 16, 16, 8, 4, 2, 1 for
128x128), so `Generator(128, ch=96, n_classes=1000, attn_resolution=64, attn_pool=True)` has
BigGAN-128's layout; `Generator(32, ch=16)` trains on a 2-core CPU in minutes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ATTENTION_CHOICES, ConditionalBatchNorm2d, DBlock, GBlock, make_attention, sn

__all__ = ["Generator", "Discriminator", "generator_widths", "discriminator_widths"]

MAX_MULT = 16  # BigGAN's widest layers are 16 x ch


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 \
            or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 8 (e.g. 32, 64, 128), got {resolution!r}")
    return resolution


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_common(attention, n_classes):
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 0:
        raise ValueError(f"n_classes must be an int >= 0 (0: unconditional), got {n_classes!r}")


def _check_attn_resolution(attn_resolution, allowed: list[int], who: str):
    if attn_resolution is not None and attn_resolution not in allowed:
        raise ValueError(
            f"attn_resolution must be None (no attention) or one of the {who}'s block resolutions "
            f"{allowed}, got {attn_resolution!r}"
        )


def generator_widths(resolution: int, ch: int) -> list[tuple[int, int]]:
    """(resolution, channels) at the 4x4 input and after each up block."""
    res = [4 * 2**i for i in range(int(math.log2(resolution)) - 1)]
    return [(r, ch * min(MAX_MULT, resolution // r)) for r in res]


def discriminator_widths(resolution: int, ch: int) -> list[tuple[int, int]]:
    """(resolution, channels) after each down block (the last one keeps 4x4)."""
    res = [resolution // 2**i for i in range(1, int(math.log2(resolution)) - 1)] + [4]
    return [(r, ch * min(MAX_MULT, resolution // (2 * r))) for r in res]


def _labels(y: Tensor | None, n_classes: int, batch: int, who: str) -> Tensor | None:
    if not n_classes:
        return None
    if y is None:
        raise ValueError(f"{who} is class-conditional (n_classes={n_classes}): pass labels y of shape ({batch},)")
    if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be integer class labels of shape ({batch},), got {y.dtype} {tuple(y.shape)}")
    return y.long()


class Generator(nn.Module):
    """z (B, z_dim) [+ labels y (B,)] -> images (B, 3, resolution, resolution) in [-1, 1].

    attn_resolution: the block output resolution the self-attention layer sits at (None: no
    attention); attn_pool: 2x2 max-pool keys/values (BigGAN) or not (SAGAN); attention:
    "fastattn" or "naive" (same parameters either way, checkpoints move between them).
    """

    def __init__(self, resolution: int = 32, *, ch: int = 32, z_dim: int = 128, n_classes: int = 0,
                 attn_resolution: int | None = 16, attn_pool: bool = False, spectral_norm: bool = True,
                 attention: str = "fastattn", backend: str | None = None):
        super().__init__()
        _check_resolution(resolution)
        _check_positive("ch", ch)
        _check_positive("z_dim", z_dim)
        _check_common(attention, n_classes)
        widths = generator_widths(resolution, ch)
        _check_attn_resolution(attn_resolution, [r for r, _ in widths[1:]], "generator")
        self.resolution, self.z_dim, self.n_classes = resolution, z_dim, n_classes
        self.attn_resolution, self.attention = attn_resolution, attention
        self.bottom_channels = widths[0][1]
        self.linear = sn(nn.Linear(z_dim, 16 * self.bottom_channels), spectral_norm)
        self.blocks = nn.ModuleList()
        self.attn_index = None
        for i, ((_, c_in), (r_out, c_out)) in enumerate(zip(widths, widths[1:])):
            self.blocks.append(GBlock(c_in, c_out, n_classes=n_classes, spectral_norm=spectral_norm))
            if r_out == attn_resolution:
                self.attn_index = i
                self.attn = make_attention(c_out, pool=attn_pool, attention=attention, backend=backend,
                                           spectral_norm=spectral_norm)
        self.out_bn = nn.BatchNorm2d(widths[-1][1])
        self.out_conv = sn(nn.Conv2d(widths[-1][1], 3, 3, padding=1), spectral_norm)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (B, {self.z_dim}), got {tuple(z.shape)}")
        y = _labels(y, self.n_classes, z.shape[0], "this generator")
        h = self.linear(z).view(z.shape[0], self.bottom_channels, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, y)
            if i == self.attn_index:
                h = self.attn(h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class Discriminator(nn.Module):
    """images (B, 3, R, R) [+ labels y (B,)] -> logits (B,), with a projection head for labels."""

    def __init__(self, resolution: int = 32, *, ch: int = 32, n_classes: int = 0,
                 attn_resolution: int | None = 16, attn_pool: bool = False, spectral_norm: bool = True,
                 attention: str = "fastattn", backend: str | None = None):
        super().__init__()
        _check_resolution(resolution)
        _check_positive("ch", ch)
        _check_common(attention, n_classes)
        widths = discriminator_widths(resolution, ch)
        _check_attn_resolution(attn_resolution, [r for r, _ in widths[:-2]], "discriminator")
        self.resolution, self.n_classes = resolution, n_classes
        self.attn_resolution, self.attention = attn_resolution, attention
        self.blocks = nn.ModuleList()
        self.attn_index = None
        c_in = 3
        for i, (r_out, c_out) in enumerate(widths):
            last = i == len(widths) - 1
            self.blocks.append(DBlock(c_in, c_out, preactivation=i > 0, downsample=not last,
                                      spectral_norm=spectral_norm))
            if r_out == attn_resolution and not last and self.attn_index is None:
                self.attn_index = i
                self.attn = make_attention(c_out, pool=attn_pool, attention=attention, backend=backend,
                                           spectral_norm=spectral_norm)
            c_in = c_out
        self.linear = sn(nn.Linear(c_in, 1), spectral_norm)
        if n_classes:
            self.embed = sn(nn.Embedding(n_classes, c_in), spectral_norm)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        expected = (3, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        y = _labels(y, self.n_classes, x.shape[0], "this discriminator")
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attn_index:
                h = self.attn(h)
        h = F.relu(h).sum(dim=(2, 3))
        out = self.linear(h).squeeze(1)
        if self.n_classes:
            out = out + (self.embed(y) * h).sum(dim=1)
        return out
