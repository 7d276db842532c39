"""A corpus of spatial-attention layers as real code writes them, for capture by computation.

Each layer computes softmax(q^T k) v somewhere in its forward, but differs from the name-based
families of fastattn/swap/families.py in the ways issue #11 lists: projections that are not bare
convs (wrappers holding `.conv`, torch SN hooks or parametrizations, a hand-written spectral norm
as a forward pre-hook that updates `u` on every call, Conv1d on flattened pixels, nn.Linear or an
einsum with a weight matrix on channels-last views), residual scalars of any name and shape or
none, norms before q/k/v, every way of scaling the logits, softmax over either axis, bmm / matmul
/ @ / einsum with any permutes and views, multi-head layers, pooled keys, the map returned next
to the output, and F.scaled_dot_product_attention. Written for these tests, in the styles of the
public code (GAN generators and discriminators, VQGAN / diffusion-GAN attention blocks); not
copied from any of it.

`CORPUS` maps a name to (builder(seed) -> module, input shape (C, H, W), points of the issue's
list it covers). `REFUSED` holds layers that must not be swapped, with a regex of the reason.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --- projections that are not bare convs ---------------------------------------------------------


class SpectralNorm:
    """A hand-written spectral norm as rosinality/sagan-pytorch writes it: a forward pre-hook that
    recomputes `weight` from `weight_orig` and updates the `weight_u` buffer on EVERY call (eval
    mode included), so two calls on the same module see different weights."""

    def __init__(self, name):
        self.name = name

    def compute_weight(self, module):
        weight = getattr(module, self.name + "_orig")
        u = getattr(module, self.name + "_u")
        size = weight.size()
        weight_mat = weight.contiguous().view(size[0], -1)
        with torch.no_grad():
            v = weight_mat.t() @ u
            v = v / v.norm()
            u = weight_mat @ v
            u = u / u.norm()
        sigma = u @ weight_mat @ v
        return weight / sigma, u

    @staticmethod
    def apply(module, name):
        fn = SpectralNorm(name)
        weight = getattr(module, name)
        del module._parameters[name]
        module.register_parameter(name + "_orig", nn.Parameter(weight.data))
        input_size = weight.size(0)
        u = weight.new_empty(input_size).normal_()
        module.register_buffer(name, weight)
        module.register_buffer(name + "_u", u)
        module.register_forward_pre_hook(fn)
        return fn

    def __call__(self, module, input):
        weight_sn, u = self.compute_weight(module)
        setattr(module, self.name, weight_sn)
        with torch.no_grad():
            getattr(module, self.name + "_u").copy_(u)


def spectral_norm(module, name="weight"):
    SpectralNorm.apply(module, name)
    return module


class ConvLayer(nn.Module):
    """A wrapper holding `.conv` (optionally spectrally normalised), as many repos write it."""

    def __init__(self, cin, cout, bias=True, sn=None):
        super().__init__()
        conv = nn.Conv2d(cin, cout, 1, bias=bias)
        if sn == "hook":
            conv = nn.utils.spectral_norm(conv)
        elif sn == "param":
            conv = nn.utils.parametrizations.spectral_norm(conv)
        elif sn == "custom":
            conv = spectral_norm(conv)
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


# --- the corpus ---------------------------------------------------------------------------------


class RosinalitySNSelfAttention(nn.Module):
    """rosinality style: Conv1d on flattened pixels, the hand-written pre-hook spectral norm,
    softmax over dim 1 (queries and keys swap roles), 0-dim gamma. Points 1, 2, 5."""

    def __init__(self, in_channel):
        super().__init__()
        self.query = spectral_norm(nn.Conv1d(in_channel, in_channel // 8, 1))
        self.key = spectral_norm(nn.Conv1d(in_channel, in_channel // 8, 1))
        self.value = spectral_norm(nn.Conv1d(in_channel, in_channel, 1))
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, input):  # noqa: A002
        shape = input.shape
        flatten = input.view(shape[0], shape[1], -1)
        query = self.query(flatten).permute(0, 2, 1)
        key = self.key(flatten)
        value = self.value(flatten)
        query_key = torch.bmm(query, key)
        attn = F.softmax(query_key, 1)
        attn = torch.bmm(value, attn)
        attn = attn.view(*shape)
        return self.gamma * attn + input


class WrappedConvSelfAttention(nn.Module):
    """Wrappers holding `.conv` with bias, residual scalar `alpha` of shape (1,), logits divided
    by sqrt(c) computed from the shape, heykeetae-style permutes. Points 1, 2, 4, 6."""

    def __init__(self, channels):
        super().__init__()
        self.to_q = ConvLayer(channels, channels // 8)
        self.to_k = ConvLayer(channels, channels // 8)
        self.to_v = ConvLayer(channels, channels)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.to_q(x).view(b, -1, h * w).permute(0, 2, 1)
        k = self.to_k(x).view(b, -1, h * w)
        energy = torch.bmm(q, k) / math.sqrt(q.shape[-1])
        attention = energy.softmax(dim=-1)
        v = self.to_v(x).view(b, -1, h * w)
        out = torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, h, w)
        return x + self.alpha * out


class ParamSNAvgPoolAttention(nn.Module):
    """Parametrized SN wrappers, keys and values average-pooled 2x2 with F.avg_pool2d, an output
    conv and a 0-dim `sigma`; matmul with transposes. Points 1, 2, 6, 8."""

    def __init__(self, ch):
        super().__init__()
        self.theta = ConvLayer(ch, ch // 8, bias=False, sn="param")
        self.phi = ConvLayer(ch, ch // 8, bias=False, sn="param")
        self.g = ConvLayer(ch, ch // 2, bias=False, sn="param")
        self.o = ConvLayer(ch // 2, ch, bias=False, sn="param")
        self.sigma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        n, c, h, w = x.size()
        theta = self.theta(x).flatten(2)
        phi = F.avg_pool2d(self.phi(x), 2).flatten(2)
        g = F.avg_pool2d(self.g(x), 2).flatten(2)
        beta = F.softmax(torch.matmul(theta.transpose(1, 2), phi), dim=-1)
        o = torch.matmul(g, beta.transpose(1, 2)).view(n, c // 2, h, w)
        return x + self.sigma * self.o(o)


class HookSNEinsumCeilPoolAttention(nn.Module):
    """torch SN hooks on bare convs, an nn.MaxPool2d(2, ceil_mode=True) child (TF SAME pooling),
    both contractions as einsum. Points 1, 6, 8."""

    def __init__(self, ch):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.f = sn(nn.Conv2d(ch, ch // 8, 1))
        self.g = sn(nn.Conv2d(ch, ch // 8, 1))
        self.h = sn(nn.Conv2d(ch, ch // 2, 1))
        self.v = sn(nn.Conv2d(ch // 2, ch, 1))
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, hh, ww = x.shape
        f = self.pool(self.f(x)).reshape(b, c // 8, -1)
        g = self.g(x).reshape(b, c // 8, -1)
        h = self.pool(self.h(x)).reshape(b, c // 2, -1)
        s = torch.einsum("bcn,bcm->bnm", g, f)
        beta = torch.softmax(s, dim=-1)
        o = torch.einsum("bnm,bcm->bcn", beta, h).reshape(b, c // 2, hh, ww)
        return self.gamma * self.v(o) + x


class LinearChannelsLastAttention(nn.Module):
    """nn.Linear projections on a channels-last (B, N, C) view, `q @ k.transpose(-2, -1) * c**-0.5`,
    an output projection and `x + h` with no scalar. Points 1, 2, 4, 6."""

    def __init__(self, dim):
        super().__init__()
        self.q = nn.Linear(dim, dim // 4)
        self.k = nn.Linear(dim, dim // 4)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.q(t), self.k(t), self.v(t)
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        attn = attn.softmax(dim=-1)
        out = self.proj(attn @ v)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class NINEinsumAttention(nn.Module):
    """"Network in network" projections: einsum with weight matrices on channels-last views, the
    scale split as c**-0.25 on q and on k, a residual scalar named `scale_res` (0-dim).
    Points 1, 2, 4, 6."""

    def __init__(self, ch):
        super().__init__()
        self.ch = ch
        self.W_q = nn.Parameter(torch.randn(ch, ch) / math.sqrt(ch))
        self.W_k = nn.Parameter(torch.randn(ch, ch) / math.sqrt(ch))
        self.W_v = nn.Parameter(torch.randn(ch, ch) / math.sqrt(ch))
        self.b_v = nn.Parameter(torch.zeros(ch))
        self.scale_res = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        B, C, H, W = x.shape
        h = x.permute(0, 2, 3, 1)  # NHWC
        q = torch.einsum("bhwc,cd->bhwd", h, self.W_q) * int(C) ** (-0.25)
        k = torch.einsum("bhwc,cd->bhwd", h, self.W_k) * int(C) ** (-0.25)
        v = torch.einsum("bhwc,cd->bhwd", h, self.W_v) + self.b_v
        q, k, v = (t.reshape(B, H * W, C) for t in (q, k, v))
        w = torch.einsum("bnc,bmc->bnm", q, k)
        w = F.softmax(w, dim=-1)
        h = torch.einsum("bnm,bmc->bnc", w, v).reshape(B, H, W, C)
        return x + self.scale_res * h.permute(0, 3, 1, 2)


class GroupNormAttnBlock(nn.Module):
    """The VQGAN / diffusion-GAN AttnBlock: GroupNorm, q/k/v 1x1 convs with bias, `int(c)**(-0.5)`,
    bmm with permutes and reshapes, softmax over dim=2, proj_out and `x + h_`. Points 2-6."""

    def __init__(self, in_channels):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups=8, num_channels=in_channels, eps=1e-6, affine=True)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)  # b, hw, c
        k = k.reshape(b, c, h * w)  # b, c, hw
        w_ = torch.bmm(q, k)  # b, hw, hw
        w_ = w_ * (int(c) ** (-0.5))
        w_ = torch.nn.functional.softmax(w_, dim=2)
        v = v.reshape(b, c, h * w)
        w_ = w_.permute(0, 2, 1)
        h_ = torch.bmm(v, w_).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class MultiHeadQKVEinsumBlock(nn.Module):
    """One qkv conv, GroupNorm, heads of 32 channels split by reshape, einsum with head
    subscripts, scale 1/sqrt(head dim) on the logits. Points 3, 4, 6, 7."""

    def __init__(self, channels, head_channels=32):
        super().__init__()
        self.heads = channels // head_channels
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.unbind(1)
        attn = torch.einsum("bhdn,bhdm->bhnm", q, k) / math.sqrt(c // self.heads)
        attn = attn.softmax(-1)
        out = torch.einsum("bhnm,bhdm->bhdn", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


class MultiHeadMatmulBlock(nn.Module):
    """Three convs, heads of 64 channels moved to the batch as (B, h, N, d), torch.matmul, the scale
    split as d**-0.25 on q and k, BatchNorm before q/k/v, 0-dim `gamma`. Points 3, 4, 6, 7."""

    def __init__(self, channels, head_channels=64):
        super().__init__()
        self.num_heads = channels // head_channels
        self.bn = nn.BatchNorm2d(channels)
        self.to_q = nn.Conv2d(channels, channels, 1, bias=False)
        self.to_k = nn.Conv2d(channels, channels, 1, bias=False)
        self.to_v = nn.Conv2d(channels, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        B, C, H, W = x.shape
        n = self.bn(x)
        d = C // self.num_heads

        def heads(t):
            return t.view(B, self.num_heads, d, H * W).transpose(-1, -2)  # (B, h, N, d)

        q = heads(self.to_q(n)) * d ** -0.25
        k = heads(self.to_k(n)) * d ** -0.25
        v = heads(self.to_v(n))
        attn = torch.matmul(q, k.transpose(-1, -2)).softmax(dim=-1)
        out = torch.matmul(attn, v)  # (B, h, N, d)
        out = out.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.gamma * out


class SDPABlock(nn.Module):
    """F.scaled_dot_product_attention called directly on (B, heads, N, d) tensors, no mask.
    Points 3, 7, 10."""

    def __init__(self, channels, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(4, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w).transpose(2, 3) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(o.transpose(2, 3).reshape(b, c, h, w))


class ReturnsMapAttention(nn.Module):
    """Returns (out, attention) as heykeetae does, but with `@`, an nn.Softmax child and `beta`.
    Points 2, 6, 9."""

    def __init__(self, ch):
        super().__init__()
        self.query_conv = nn.Conv2d(ch, ch // 8, 1)
        self.key_conv = nn.Conv2d(ch, ch // 8, 1)
        self.value_conv = nn.Conv2d(ch, ch // 2, 1)
        self.out_conv = nn.Conv2d(ch // 2, ch, 1)
        self.softmax = nn.Softmax(dim=-1)
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.size()
        q = self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)
        k = self.key_conv(x).view(b, -1, h * w)
        attention = self.softmax(q @ k)
        v = self.value_conv(x).view(b, -1, h * w)
        out = (v @ attention.permute(0, 2, 1)).view(b, -1, h, w)
        return x + self.beta * self.out_conv(out), attention


class NoResidualAttention(nn.Module):
    """No residual at all: the layer returns the projected attention output. Point 2."""

    def __init__(self, ch):
        super().__init__()
        self.q = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.k = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.v = nn.Conv2d(ch, ch, 1, bias=False)
        self.o = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        logits = torch.bmm(self.q(x).flatten(2).transpose(1, 2), self.k(x).flatten(2))
        a = torch.softmax(logits, -1)
        y = torch.bmm(self.v(x).flatten(2), a.transpose(1, 2))
        return self.o(y.view(b, c, h, w))


class AvgPoolModuleAttention(nn.Module):
    """An nn.AvgPool2d child pooling keys and values, BatchNorm before the projections, residual
    from the un-normed input, `sigma` (1,). Points 2, 3, 8."""

    def __init__(self, ch):
        super().__init__()
        self.bn = nn.BatchNorm2d(ch)
        self.theta = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.phi = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.g = nn.Conv2d(ch, ch // 2, 1, bias=False)
        self.o = nn.Conv2d(ch // 2, ch, 1, bias=False)
        self.down = nn.AvgPool2d(2)
        self.sigma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        _, ch, h, w = x.size()
        n = self.bn(x)
        theta = self.theta(n).view(-1, ch // 8, h * w)
        phi = self.down(self.phi(n)).view(-1, ch // 8, h * w // 4)
        attn = torch.bmm(theta.permute(0, 2, 1), phi).softmax(-1)
        g = self.down(self.g(n)).view(-1, ch // 2, h * w // 4)
        return x + self.sigma * self.o(torch.bmm(g, attn.permute(0, 2, 1)).view(-1, ch // 2, h, w))


class KeysFirstLogitsAttention(nn.Module):
    """Logits laid out (B, M, N) as k^T q, softmax over dim 1 (the keys), einsum afterwards;
    keys max-pooled with F.max_pool2d ceil_mode. Points 5, 6, 8."""

    def __init__(self, ch):
        super().__init__()
        self.q = nn.Conv2d(ch, ch // 8, 1)
        self.k = nn.Conv2d(ch, ch // 8, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.q(x).flatten(2)
        k = F.max_pool2d(self.k(x), 2, ceil_mode=True).flatten(2)
        v = F.max_pool2d(self.v(x), 2, ceil_mode=True).flatten(2)
        s = torch.bmm(k.transpose(1, 2), q)  # (B, M, N)
        p = F.softmax(s, dim=1)
        o = torch.einsum("bcm,bmn->bcn", v, p)
        return x + self.gamma * o.view(b, c, h, w)


class FloatSoftmaxHeadsInBatch(nn.Module):
    """Diffusion style: heads of 32 folded into the batch with reshape, bmm, logits scaled by a
    Python float attribute, softmax in fp32 then cast back (`.float().softmax(-1).type(dtype)`).
    Points 4, 6, 7."""

    def __init__(self, channels, head_channels=32):
        super().__init__()
        self.n_heads = channels // head_channels
        self.scale = head_channels ** -0.5
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x_flat))
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        weight = torch.bmm(q.transpose(1, 2), k) * self.scale  # (B*h, N, M)
        weight = weight.float().softmax(dim=-1).type(weight.dtype)
        a = torch.bmm(v, weight.transpose(1, 2))
        h = self.proj_out(a.reshape(bs, -1, length))
        return (x_flat + h).reshape(b, c, *spatial)


class CustomSNPooledStudioStyle(nn.Module):
    """StudioGAN's math with every conv under the hand-written pre-hook spectral norm, an
    nn.MaxPool2d child and `sigma`: the stateful SN combined with pooling and an output conv.
    Points 1, 2, 8."""

    def __init__(self, in_channels):
        super().__init__()
        conv = lambda cin, cout: spectral_norm(nn.Conv2d(cin, cout, 1, bias=False))  # noqa: E731
        self.conv1x1_theta = conv(in_channels, in_channels // 8)
        self.conv1x1_phi = conv(in_channels, in_channels // 8)
        self.conv1x1_g = conv(in_channels, in_channels // 2)
        self.conv1x1_attn = conv(in_channels // 2, in_channels)
        self.maxpool = nn.MaxPool2d(2, stride=2, padding=0)
        self.sigma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        _, ch, h, w = x.size()
        theta = self.conv1x1_theta(x).view(-1, ch // 8, h * w)
        phi = self.maxpool(self.conv1x1_phi(x)).view(-1, ch // 8, h * w // 4)
        attn = F.softmax(torch.bmm(theta.permute(0, 2, 1), phi), dim=-1)
        g = self.maxpool(self.conv1x1_g(x)).view(-1, ch // 2, h * w // 4)
        attn_g = torch.bmm(g, attn.permute(0, 2, 1)).view(-1, ch // 2, h, w)
        return x + self.sigma * self.conv1x1_attn(attn_g)


class EllipsisEinsumInplaceScale(nn.Module):
    """einsum with an ellipsis, the logits scaled in place (`mul_`), softmax via torch.softmax,
    residual scalar `weight_attn` (1,). Points 2, 4, 6."""

    def __init__(self, ch):
        super().__init__()
        self.proj_q = nn.Conv2d(ch, ch // 4, 1)
        self.proj_k = nn.Conv2d(ch, ch // 4, 1)
        self.proj_v = nn.Conv2d(ch, ch, 1)
        self.weight_attn = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (p(x).flatten(2) for p in (self.proj_q, self.proj_k, self.proj_v))
        logits = torch.einsum("...cn,...cm->...nm", q, k)
        logits.mul_(1.0 / math.sqrt(q.size(1)))
        attn = torch.softmax(logits, dim=-1)
        out = torch.einsum("...nm,...cm->...cn", attn, v)
        return x + self.weight_attn * out.reshape(b, c, h, w)


class MultiHeadPooledReturnsMap(nn.Module):
    """Multi-head (2 heads of 32) with pooled keys (nn.MaxPool2d), torch.matmul, the averaged
    map returned next to the output. Points 7, 8, 9."""

    def __init__(self, ch, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.pool = nn.MaxPool2d(2)
        self.o = nn.Conv2d(ch, ch, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).chunk(3, 1)
        k, v = self.pool(k), self.pool(v)
        d = C // self.heads
        q = q.reshape(B, self.heads, d, -1)
        k = k.reshape(B, self.heads, d, -1)
        v = v.reshape(B, self.heads, d, -1)
        attn = torch.matmul(q.transpose(-2, -1), k).softmax(-1)  # (B, h, N, M)
        out = torch.matmul(v, attn.transpose(-2, -1)).reshape(B, C, H, W)
        return x + self.gamma * self.o(out), attn.mean(1)


class BigGANYIgnored(nn.Module):
    """BigGAN-style `forward(x, y=None)` whose y is ignored, wrapped projections with hook SN,
    `* c**-0.5` on the logits: swapped, verified with a random y. Points 1, 4, 8."""

    def __init__(self, ch):
        super().__init__()
        self.ch = ch
        self.theta = ConvLayer(ch, ch // 8, bias=False, sn="hook")
        self.phi = ConvLayer(ch, ch // 8, bias=False, sn="hook")
        self.g = ConvLayer(ch, ch // 2, bias=False, sn="hook")
        self.o = ConvLayer(ch // 2, ch, bias=False, sn="hook")
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, y=None):
        theta = self.theta(x).view(-1, self.ch // 8, x.shape[2] * x.shape[3])
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(-1, self.ch // 8, x.shape[2] * x.shape[3] // 4)
        g = F.max_pool2d(self.g(x), [2, 2]).view(-1, self.ch // 2, x.shape[2] * x.shape[3] // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi) * (self.ch // 8) ** -0.5, -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(-1, self.ch // 2, x.shape[2], x.shape[3]))
        return self.gamma * o + x


class SwappedRolesEinsumHeads(nn.Module):
    """Softmax over the query conv's axis (dim 1 of (B, N, M) logits, i.e. roles swapped), with
    heads of 32 split by view into the batch and einsum. Points 5, 6, 7."""

    def __init__(self, ch, head=32):
        super().__init__()
        self.h = ch // head
        self.a = nn.Conv2d(ch, ch, 1)
        self.b = nn.Conv2d(ch, ch, 1)
        self.c = nn.Conv2d(ch, ch, 1)
        self.gain = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        B, C, H, W = x.shape
        a = self.a(x).view(B * self.h, C // self.h, H * W)
        bb = self.b(x).view(B * self.h, C // self.h, H * W)
        c = self.c(x).view(B * self.h, C // self.h, H * W)
        s = torch.einsum("zdi,zdj->zij", a, bb)
        p = torch.softmax(s, dim=1)  # over a's pixels: a plays the keys
        o = torch.einsum("zcj,zij->zci", c, p.transpose(1, 2).transpose(1, 2).transpose(1, 2))
        return x + self.gain * o.reshape(B, C, H, W)


def _seeded(cls, *args):
    def build(seed=0):
        torch.manual_seed(seed)
        return cls(*args)

    build.__name__ = cls.__name__
    return build


#: name -> (builder(seed), input (C, H, W), points of the issue's list covered)
CORPUS = {
    "rosinality_custom_sn": (_seeded(RosinalitySNSelfAttention, 16), (16, 4, 6), (1, 2, 5)),
    "wrapped_conv_sqrt": (_seeded(WrappedConvSelfAttention, 16), (16, 5, 3), (1, 2, 4, 6)),
    "param_sn_avgpool": (_seeded(ParamSNAvgPoolAttention, 16), (16, 6, 4), (1, 2, 6, 8)),
    "hook_sn_einsum_ceilpool": (_seeded(HookSNEinsumCeilPoolAttention, 16), (16, 5, 4), (1, 6, 8)),
    "linear_channels_last": (_seeded(LinearChannelsLastAttention, 16), (16, 4, 5), (1, 2, 4, 6)),
    "nin_einsum_split_scale": (_seeded(NINEinsumAttention, 16), (16, 3, 4), (1, 2, 4, 6)),
    "groupnorm_attnblock": (_seeded(GroupNormAttnBlock, 16), (16, 4, 4), (2, 3, 4, 5, 6)),
    "multihead_qkv_einsum_h32": (_seeded(MultiHeadQKVEinsumBlock, 64), (64, 3, 4), (3, 4, 6, 7)),
    "multihead_matmul_h64_bn": (_seeded(MultiHeadMatmulBlock, 128), (128, 3, 3), (3, 4, 6, 7)),
    "sdpa_heads": (_seeded(SDPABlock, 16), (16, 4, 3), (3, 7, 10)),
    "returns_map_at": (_seeded(ReturnsMapAttention, 16), (16, 4, 4), (2, 6, 9)),
    "no_residual": (_seeded(NoResidualAttention, 16), (16, 3, 5), (2,)),
    "bn_avgpool_module": (_seeded(AvgPoolModuleAttention, 16), (16, 6, 6), (2, 3, 8)),
    "keys_first_logits_dim1": (_seeded(KeysFirstLogitsAttention, 16), (16, 5, 5), (5, 6, 8)),
    "float_softmax_heads_in_batch": (_seeded(FloatSoftmaxHeadsInBatch, 64), (64, 3, 4), (3, 4, 6, 7)),
    "custom_sn_studio_pooled": (_seeded(CustomSNPooledStudioStyle, 16), (16, 4, 6), (1, 2, 8)),
    "ellipsis_einsum_inplace_scale": (_seeded(EllipsisEinsumInplaceScale, 16), (16, 4, 3), (2, 4, 6)),
    "multihead_pooled_returns_map": (_seeded(MultiHeadPooledReturnsMap, 64), (64, 4, 4), (7, 8, 9)),
    "biggan_y_ignored_scaled": (_seeded(BigGANYIgnored, 16), (16, 4, 4), (1, 4, 8)),
    "swapped_roles_einsum_heads": (_seeded(SwappedRolesEinsumHeads, 64), (64, 3, 3), (5, 6, 7)),
}


# --- layers that must NOT be swapped ------------------------------------------------------------


class DropoutOnMap(WrappedConvSelfAttention):
    """Dropout on the attention map (training only): another op than softmax(q^T k) v."""

    def __init__(self, channels):
        super().__init__(channels)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.to_q(x).view(b, -1, h * w).permute(0, 2, 1)
        k = self.to_k(x).view(b, -1, h * w)
        attention = self.drop(torch.bmm(q, k).softmax(dim=-1))
        v = self.to_v(x).view(b, -1, h * w)
        return x + self.alpha * torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, h, w)


class BiasOnLogits(GroupNormAttnBlock):
    """A distance penalty added to the logits (ALiBi-like, a bias that depends on positions)."""

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        pos = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
        pos = pos.reshape(h * w, 2).to(x.dtype)
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * c ** -0.5
        w_ = F.softmax(w_ - torch.cdist(pos, pos), dim=2)
        h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class MaskedLogits(NoResidualAttention):
    """A mask on the logits (a pixel may not attend to itself)."""

    def forward(self, x):
        b, c, h, w = x.shape
        logits = torch.bmm(self.q(x).flatten(2).transpose(1, 2), self.k(x).flatten(2))
        eye = torch.eye(h * w, dtype=torch.bool, device=x.device)
        a = torch.softmax(logits.masked_fill(eye, float("-inf")), -1)
        return self.o(torch.bmm(self.v(x).flatten(2), a.transpose(1, 2)).view(b, c, h, w))


class SDPAWithMask(SDPABlock):
    """F.scaled_dot_product_attention with an attn_mask."""

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w).transpose(2, 3) for t in (q, k, v))
        mask = torch.ones(h * w, h * w, dtype=torch.bool, device=x.device).tril()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.out(o.transpose(2, 3).reshape(b, c, h, w))


class UsesContext(NoResidualAttention):
    """forward(x, context=None) whose keys and values come from a context of its own shape: the
    probe cannot make a context this forward accepts, so the layer cannot be verified."""

    def __init__(self, ch, context_ch=7):
        super().__init__(ch)
        self.k = nn.Conv1d(context_ch, ch // 8, 1, bias=False)
        self.v = nn.Conv1d(context_ch, ch, 1, bias=False)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        context = x.flatten(2)[:, :7] if context is None else context
        logits = torch.bmm(self.q(x).flatten(2).transpose(1, 2), self.k(context))
        a = torch.softmax(logits, -1)
        return self.o(torch.bmm(self.v(context), a.transpose(1, 2)).view(b, c, h, w))


class NoTransposeOldFork(NoResidualAttention):
    """The old heykeetae forks' op: the map is not transposed, so v is contracted over queries."""

    def forward(self, x):
        b, c, h, w = x.shape
        a = torch.softmax(torch.bmm(self.q(x).flatten(2).transpose(1, 2), self.k(x).flatten(2)), -1)
        return self.o(torch.bmm(self.v(x).flatten(2), a).view(b, c, h, w))


#: name -> (builder(seed), input (C, H, W), regex the skip reason must match)
REFUSED = {
    "dropout_on_map": (_seeded(DropoutOnMap, 16), (16, 4, 4), r"dropout"),
    "bias_on_logits": (_seeded(BiasOnLogits, 16), (16, 4, 4), r"subtracted from the logits"),
    "masked_logits": (_seeded(MaskedLogits, 16), (16, 4, 4), r"mask"),
    "sdpa_with_mask": (_seeded(SDPAWithMask, 16), (16, 4, 4), r"mask"),
    "uses_context": (_seeded(UsesContext, 16), (16, 4, 4), r"context"),
    "no_transpose_old_fork": (_seeded(NoTransposeOldFork, 16), (16, 4, 4), r"query axis|not the softmax"),
}
