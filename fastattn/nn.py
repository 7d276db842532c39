"""Drop-in self-attention layer for (B, C, H, W) feature maps, as attention GANs use it.

`SelfAttention2d` covers both layer families of ../shared/GAN_LAYERS.md:

    unpooled (heykeetae SAGAN):  SelfAttention2d(C, pool=False, out_conv=False, bias=True)
    pooled (BigGAN, StudioGAN):  SelfAttention2d(C, pool=True, spectral_norm=True)

Submodules and parameters follow BigGAN-PyTorch's names: `theta` (queries), `phi` (keys), `g`
(values), `o` (output 1x1 conv, absent with out_conv=False) and the residual scalar `gamma`
(0-dim, initialised to 0, so the layer starts as the identity). `attention="naive"` computes the
original bmm -> softmax -> bmm through `fastattn.reference`; `attention="fastattn"` calls
`fastattn.spatial_attention` on views of the conv outputs. Both use the same parameters, so a
state_dict moves between them unchanged.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import check_backend_name
from .functional import spatial_attention
from .reference import reference_attention

__all__ = ["SelfAttention2d", "attention_core", "max_pool_keys"]

_ATTENTION_MODES = ("fastattn", "naive")


def attention_core(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = 1.0,
                   backend: str | None = None, return_lse: bool = False):
    """`spatial_attention` on conv outputs, outside autocast.

    Under autocast the conv outputs arrive in the low-precision dtype; the attention itself keeps
    them in that dtype but accumulates in fp32 inside the backend, as a fused kernel does. Autocast
    is switched off around the call so it cannot push the backend's fp32 accumulation (bmm) back
    into fp16/bf16. Mixed dtypes (possible when a user's pool or conv runs outside autocast) are
    brought to q's dtype.
    """
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    # entering torch.autocast costs ~4 us (warm) per call, a few % of a CIFAR-sized layer: only
    # when autocast is on (meta tensors, for shape inference, have no autocast state)
    if q.device.type == "meta" or not _autocast_enabled(q.device.type):
        return spatial_attention(q, k, v, scale=scale, backend=backend, return_lse=return_lse)
    with torch.autocast(q.device.type, enabled=False):
        return spatial_attention(q, k, v, scale=scale, backend=backend, return_lse=return_lse)


def max_pool_keys(t: Tensor) -> Tensor:
    """2x2 max-pooling, stride 2, floor: M = floor(H/2) * floor(W/2), as the pooled layers do."""
    return F.max_pool2d(t, kernel_size=2, stride=2)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for types autocast does not know, e.g.
    meta; torch < 2.4 has no device_type argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    except RuntimeError:
        return False


def _check_channels(name: str, value, default: int | None) -> int:
    """value, or `default` when value is None and there is one (None: the argument is required)."""
    if value is None and default is not None:
        value = default
    if value is None:
        raise TypeError(f"{name} must be a positive int, got None")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class SelfAttention2d(nn.Module):
    """y = x + gamma * o(attention(theta(x), pool(phi(x)), pool(g(x)))), shape of x.

    in_channels: C, the channels of the input feature map.
    qk_channels: d_qk of queries and keys (default C // 8).
    v_channels: d_v of values (default C // 2 with pool, else C).
    pool: 2x2 max-pool (floor) keys and values, so M = floor(H/2) * floor(W/2).
    out_conv: a 1x1 conv `o` from d_v back to C; without it v_channels must equal C.
    bias: bias on the 1x1 convs.
    spectral_norm: wrap every conv with torch.nn.utils.parametrizations.spectral_norm
        (`sn_eps` is its eps; StudioGAN uses 1e-6, the HF BigGAN release 1e-4).
    attention: "fastattn" (fused / memory-efficient) or "naive" (the original bmm math).
    backend: passed to `fastattn.spatial_attention` (None = automatic); only with "fastattn".
    """

    def __init__(self, in_channels: int, *, qk_channels: int | None = None,
                 v_channels: int | None = None, pool: bool = False, out_conv: bool = True,
                 bias: bool = False, spectral_norm: bool = False, attention: str = "fastattn",
                 backend: str | None = None, sn_eps: float = 1e-12):
        super().__init__()
        in_channels = _check_channels("in_channels", in_channels, None)
        if isinstance(sn_eps, bool) or not isinstance(sn_eps, numbers.Real):
            raise TypeError(f"sn_eps must be a positive float, got {type(sn_eps).__name__} {sn_eps!r}")
        if not 0 < sn_eps < math.inf:
            raise ValueError(f"sn_eps (the spectral norm's eps) must be a finite number > 0, got {sn_eps!r}")
        for name, flag in (("pool", pool), ("out_conv", out_conv), ("bias", bias),
                           ("spectral_norm", spectral_norm)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        qk_channels = _check_channels("qk_channels", qk_channels, max(1, in_channels // 8))
        v_channels = _check_channels("v_channels", v_channels,
                                     max(1, in_channels // 2) if pool else in_channels)
        if not out_conv and v_channels != in_channels:
            raise ValueError(
                f"out_conv=False adds the attention output to x directly, so v_channels must equal "
                f"in_channels={in_channels}; got v_channels={v_channels} (pass out_conv=True, or "
                f"v_channels={in_channels})"
            )
        if attention not in _ATTENTION_MODES:
            raise ValueError(f"attention must be one of {_ATTENTION_MODES}, got {attention!r}")
        # a known name is enough here: the layer may be built on a machine that will not run it
        check_backend_name(backend, must_run_here=False)
        if backend is not None and attention != "fastattn":
            raise ValueError(f"backend={backend!r} only applies to attention='fastattn', "
                             f"got attention={attention!r}")
        self.in_channels, self.qk_channels, self.v_channels = in_channels, qk_channels, v_channels
        self.pool, self.attention, self.backend = pool, attention, backend

        def conv(cin: int, cout: int) -> nn.Module:
            layer = nn.Conv2d(cin, cout, kernel_size=1, bias=bias)
            if spectral_norm:
                layer = nn.utils.parametrizations.spectral_norm(layer, eps=sn_eps)
            return layer

        self.theta = conv(in_channels, qk_channels)
        self.phi = conv(in_channels, qk_channels)
        self.g = conv(in_channels, v_channels)
        self.o = conv(v_channels, in_channels) if out_conv else None
        self.gamma = nn.Parameter(torch.zeros(()))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, qk_channels={self.qk_channels}, "
                f"v_channels={self.v_channels}, pool={self.pool}, attention={self.attention!r}, "
                f"backend={self.backend!r}")

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, {self.in_channels}, H, W), "
                            f"got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, in_channels={self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor like the layer's weights "
                            f"({self._weight().dtype}), got {x.dtype}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"x must have H >= 1 and W >= 1 (attention over no positions is undefined), "
                             f"got shape {tuple(x.shape)}")
        weight = self._weight()
        if x.dtype != weight.dtype and not _autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the layer's weights are {weight.dtype}: pass x as "
                            f"{weight.dtype}, convert the layer with .to({x.dtype}), or run under torch.autocast")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the layer's weights are on {weight.device}: "
                             f"move x (or the layer with .to({str(x.device)!r}))")
        if self.pool and (x.shape[2] < 2 or x.shape[3] < 2):
            raise ValueError(f"pool=True max-pools keys 2x2, so x needs H >= 2 and W >= 2, "
                             f"got {tuple(x.shape)}")

    def _weight(self) -> Tensor:
        """theta's weight parameter (the original under spectral norm, without a power step)."""
        return next(self.theta.parameters())

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """q (B, d_qk, N), k (B, d_qk, M), v (B, d_v, M) as views of the conv outputs, and the
        (h, w) of the key grid."""
        q, k, v = self.theta(x), self.phi(x), self.g(x)
        if self.pool:
            k, v = max_pool_keys(k), max_pool_keys(v)
        return q.flatten(2), k.flatten(2), v.flatten(2), (k.shape[2], k.shape[3])

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        q, k, v, _ = self.qkv(x)
        if self.attention == "naive":
            out = reference_attention(q, k, v)
        else:
            out = attention_core(q, k, v, backend=self.backend)
        out = out.view(x.shape[0], self.v_channels, x.shape[2], x.shape[3])
        if self.o is not None:
            out = self.o(out)
        return x + self.gamma * out

    def attention_map(self, x: Tensor):
        """The (B, N, M) attention of x as a lazy `fastattn.AttentionMap` (rows on demand)."""
        from .attention_map import AttentionMap

        self._check_input(x)
        q, k, _, key_hw = self.qkv(x)
        return AttentionMap(q, k, query_hw=(x.shape[2], x.shape[3]), key_hw=key_hw)
