"""Replicas of the users' attention layers, as the public GAN repositories write them.

Written from ../shared/GAN_LAYERS.md (names, shapes, spectral-norm flavour, bias, forward
signature and the naive bmm -> softmax -> bmm forward), not copied. They are the "user code" the
swap tests, the reference-GAN helper and the benchmarks compare fastattn against, so their
forwards keep the originals' quirks: `view(..., h * w // 4)` in the pooled layers (odd sizes
crash), heykeetae's `(out, attention)` return, BigGAN's `forward(x, y=None)` and its own
spectral norm with `u0` / `sv0` buffers, rosinality's Conv1d layer with softmax over dim 1.

`FAMILY_BUILDERS` maps a family name to a builder `(channels, seed) -> module` for
parametrized tests; `PARTIAL_MATCHES` holds look-alikes that must not be swapped.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

# --- BigGAN-PyTorch's own spectral norm (ajbrock/BigGAN-PyTorch layers.py, by description) ----


def _gram_schmidt(x, ys):
    for y in ys:
        x = x - (x @ y.t()) * y  # project out previous singular vectors
    return x


def _power_iteration(weight, us, update=True, eps=1e-12):
    """One power-iteration step per singular value; updates the u buffers in place if asked."""
    new_us, new_vs, svs = [], [], []
    for i, u in enumerate(us):
        with torch.no_grad():
            v = F.normalize(_gram_schmidt(u @ weight, new_vs), eps=eps)
            new_vs.append(v)
            u = F.normalize(_gram_schmidt(v @ weight.t(), new_us), eps=eps)
            new_us.append(u)
            if update:
                us[i][:] = u
        svs.append(torch.squeeze((v @ weight.t()) @ u.t()))
    return svs, new_us, new_vs


class BigGANSN:
    """Mixin: buffers u{i} (1, out) and sv{i} (1,), power iteration only in training."""

    def _init_sn(self, num_svs, num_itrs, num_outputs, eps=1e-12):
        self.num_itrs, self.num_svs, self.sn_eps = num_itrs, num_svs, eps
        for i in range(num_svs):
            self.register_buffer(f"u{i}", torch.randn(1, num_outputs))
            self.register_buffer(f"sv{i}", torch.ones(1))

    @property
    def u(self):
        return [getattr(self, f"u{i}") for i in range(self.num_svs)]

    @property
    def sv(self):
        return [getattr(self, f"sv{i}") for i in range(self.num_svs)]

    def normalized_weight(self):
        weight = self.weight.view(self.weight.size(0), -1)
        for _ in range(self.num_itrs):
            svs, _, _ = _power_iteration(weight, self.u, update=self.training, eps=self.sn_eps)
        if self.training:
            with torch.no_grad():
                for i, sv in enumerate(svs):
                    self.sv[i][:] = sv
        return self.weight / svs[0]


class SNConv2d(nn.Conv2d, BigGANSN):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias)
        self._init_sn(num_svs, num_itrs, out_channels, eps=eps)

    def forward(self, x):
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


# --- the families ------------------------------------------------------------------------------


class Self_Attn(nn.Module):  # noqa: N801  (heykeetae's name)
    """heykeetae/Self-Attention-GAN: unpooled, value width C, convs with bias, returns the map."""

    def __init__(self, in_dim, activation):
        super().__init__()
        self.chanel_in = in_dim
        self.activation = activation
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        batch, channels, width, height = x.size()
        proj_query = self.query_conv(x).view(batch, -1, width * height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(batch, -1, width * height)
        energy = torch.bmm(proj_query, proj_key)
        attention = self.softmax(energy)
        proj_value = self.value_conv(x).view(batch, -1, width * height)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1))
        out = out.view(batch, channels, width, height)
        out = self.gamma * out + x
        return out, attention


class Attention(nn.Module):
    """ajbrock/BigGAN-PyTorch: pooled, own SN, 0-dim gamma, forward(x, y=None)."""

    def __init__(self, ch, which_conv=SNConv2d, name="attention"):
        super().__init__()
        self.ch = ch
        self.which_conv = which_conv
        self.theta = self.which_conv(self.ch, self.ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = self.which_conv(self.ch, self.ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = self.which_conv(self.ch, self.ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = self.which_conv(self.ch // 2, self.ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0), requires_grad=True)

    def forward(self, x, y=None):
        theta = self.theta(x)
        phi = F.max_pool2d(self.phi(x), [2, 2])
        g = F.max_pool2d(self.g(x), [2, 2])
        theta = theta.view(-1, self.ch // 8, x.shape[2] * x.shape[3])
        phi = phi.view(-1, self.ch // 8, x.shape[2] * x.shape[3] // 4)
        g = g.view(-1, self.ch // 2, x.shape[2] * x.shape[3] // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(g.bmm(beta.transpose(1, 2)).view(-1, self.ch // 2, x.shape[2], x.shape[3]))
        return self.gamma * o + x


def _hook_snconv2d(eps, **kwargs):
    return nn.utils.spectral_norm(nn.Conv2d(**kwargs), eps=eps)


def _param_snconv2d(eps, **kwargs):
    return nn.utils.parametrizations.spectral_norm(nn.Conv2d(**kwargs), eps=eps)


def studiogan_modules(sn="hook"):
    """StudioGAN's MODULES namespace: g_conv2d / d_conv2d are spectrally normalised convs."""
    make = {"hook": _hook_snconv2d, "parametrization": _param_snconv2d}[sn]
    conv = functools.partial(make, 1e-6)
    return SimpleNamespace(g_conv2d=conv, d_conv2d=conv)


class SelfAttention(nn.Module):
    """POSTECH-CVLab/PyTorch-StudioGAN: pooled via a `maxpool` child, `sigma`, no bias."""

    def __init__(self, in_channels, is_generator, MODULES):  # noqa: N803
        super().__init__()
        self.in_channels = in_channels
        conv = MODULES.g_conv2d if is_generator else MODULES.d_conv2d
        self.conv1x1_theta = conv(in_channels=in_channels, out_channels=in_channels // 8,
                                  kernel_size=1, stride=1, padding=0, bias=False)
        self.conv1x1_phi = conv(in_channels=in_channels, out_channels=in_channels // 8,
                                kernel_size=1, stride=1, padding=0, bias=False)
        self.conv1x1_g = conv(in_channels=in_channels, out_channels=in_channels // 2,
                              kernel_size=1, stride=1, padding=0, bias=False)
        self.conv1x1_attn = conv(in_channels=in_channels // 2, out_channels=in_channels,
                                 kernel_size=1, stride=1, padding=0, bias=False)
        self.maxpool = nn.MaxPool2d(2, stride=2, padding=0)
        self.softmax = nn.Softmax(dim=-1)
        self.sigma = nn.Parameter(torch.zeros(1), requires_grad=True)

    def forward(self, x):
        _, ch, h, w = x.size()
        theta = self.conv1x1_theta(x).view(-1, ch // 8, h * w)
        phi = self.maxpool(self.conv1x1_phi(x)).view(-1, ch // 8, h * w // 4)
        attn = self.softmax(torch.bmm(theta.permute(0, 2, 1), phi))
        g = self.maxpool(self.conv1x1_g(x)).view(-1, ch // 2, h * w // 4)
        attn_g = torch.bmm(g, attn.permute(0, 2, 1)).view(-1, ch // 2, h, w)
        attn_g = self.conv1x1_attn(attn_g)
        return x + self.sigma * attn_g


class SelfAttn(nn.Module):
    """huggingface/pytorch-pretrained-BigGAN: snconv1x1_* with hook SN (eps 1e-4 released)."""

    def __init__(self, in_channels, eps=1e-12):
        super().__init__()
        self.in_channels = in_channels
        sn = functools.partial(_hook_snconv2d, eps)
        self.snconv1x1_theta = sn(in_channels=in_channels, out_channels=in_channels // 8, kernel_size=1, bias=False)
        self.snconv1x1_phi = sn(in_channels=in_channels, out_channels=in_channels // 8, kernel_size=1, bias=False)
        self.snconv1x1_g = sn(in_channels=in_channels, out_channels=in_channels // 2, kernel_size=1, bias=False)
        self.snconv1x1_o_conv = sn(in_channels=in_channels // 2, out_channels=in_channels, kernel_size=1, bias=False)
        self.maxpool = nn.MaxPool2d(2, stride=2, padding=0)
        self.softmax = nn.Softmax(dim=-1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        _, ch, h, w = x.size()
        theta = self.snconv1x1_theta(x).view(-1, ch // 8, h * w)
        phi = self.maxpool(self.snconv1x1_phi(x)).view(-1, ch // 8, h * w // 4)
        attn = self.softmax(torch.bmm(theta.permute(0, 2, 1), phi))
        g = self.maxpool(self.snconv1x1_g(x)).view(-1, ch // 2, h * w // 4)
        attn_g = torch.bmm(g, attn.permute(0, 2, 1)).view(-1, ch // 2, h, w)
        attn_g = self.snconv1x1_o_conv(attn_g)
        return x + self.gamma * attn_g


class VoletivSelfAttn(nn.Module):
    """voletiv/self-attention-GAN-pytorch: StudioGAN's math, hook-SN convs WITH bias."""

    def __init__(self, in_channels):
        super().__init__()
        self.in_channels = in_channels
        sn = functools.partial(_hook_snconv2d, 1e-12)
        self.snconv1x1_theta = sn(in_channels=in_channels, out_channels=in_channels // 8, kernel_size=1)
        self.snconv1x1_phi = sn(in_channels=in_channels, out_channels=in_channels // 8, kernel_size=1)
        self.snconv1x1_g = sn(in_channels=in_channels, out_channels=in_channels // 2, kernel_size=1)
        self.snconv1x1_attn = sn(in_channels=in_channels // 2, out_channels=in_channels, kernel_size=1)
        self.maxpool = nn.MaxPool2d(2, stride=2, padding=0)
        self.softmax = nn.Softmax(dim=-1)
        self.sigma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        _, ch, h, w = x.size()
        theta = self.snconv1x1_theta(x).view(-1, ch // 8, h * w)
        phi = self.maxpool(self.snconv1x1_phi(x)).view(-1, ch // 8, h * w // 4)
        attn = self.softmax(torch.bmm(theta.permute(0, 2, 1), phi))
        g = self.maxpool(self.snconv1x1_g(x)).view(-1, ch // 2, h * w // 4)
        attn_g = torch.bmm(g, attn.permute(0, 2, 1)).view(-1, ch // 2, h, w)
        return x + self.sigma * self.snconv1x1_attn(attn_g)


def _spectral_init(module, gain=1.0):
    nn.init.xavier_uniform_(module.weight, gain)
    if module.bias is not None:
        module.bias.data.zero_()
    return nn.utils.spectral_norm(module)


class RosinalitySelfAttention(nn.Module):
    """rosinality/sagan-pytorch: Conv1d on the flattened map, softmax over dim 1 (queries)."""

    def __init__(self, in_channel, gain=2 ** 0.5):
        super().__init__()
        self.query = _spectral_init(nn.Conv1d(in_channel, in_channel // 8, 1), gain=gain)
        self.key = _spectral_init(nn.Conv1d(in_channel, in_channel // 8, 1), gain=gain)
        self.value = _spectral_init(nn.Conv1d(in_channel, in_channel, 1), gain=gain)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, input):  # noqa: A002  (the original's name)
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


class TakiGoogleAttention(nn.Module):
    """A PyTorch port of taki0112's TF `google_attention`: f (keys) and h (values) pooled with
    TF 'SAME' padding (odd sizes round up), g gives queries, convs with bias, param SN."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        sn = functools.partial(_param_snconv2d, 1e-12)
        self.f_conv = sn(in_channels=channels, out_channels=channels // 8, kernel_size=1)
        self.g_conv = sn(in_channels=channels, out_channels=channels // 8, kernel_size=1)
        self.h_conv = sn(in_channels=channels, out_channels=channels // 2, kernel_size=1)
        self.attn_conv = sn(in_channels=channels // 2, out_channels=channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        batch, _, height, width = x.shape
        f = F.max_pool2d(self.f_conv(x), 2, 2, ceil_mode=True)  # TF SAME padding
        g = self.g_conv(x)
        h = F.max_pool2d(self.h_conv(x), 2, 2, ceil_mode=True)
        s = torch.bmm(g.flatten(2).transpose(1, 2), f.flatten(2))  # (B, N, M)
        beta = F.softmax(s, dim=-1)
        o = torch.bmm(beta, h.flatten(2).transpose(1, 2))  # (B, N, C/2)
        o = o.transpose(1, 2).reshape(batch, self.channels // 2, height, width)
        return self.gamma * self.attn_conv(o) + x


# --- look-alikes that must NOT be swapped as they are ------------------------------------------


class AttentionWithNorm(Attention):
    """BigGAN's block with a BatchNorm after the residual: an extra child the family lacks."""

    def __init__(self, ch, which_conv=SNConv2d):
        super().__init__(ch, which_conv)
        self.norm = nn.BatchNorm2d(ch)

    def forward(self, x, y=None):
        return self.norm(super().forward(x, y))


class OldForkSelfAttn(Self_Attn):
    """heykeetae's layer as forks before mid-2018 had it: no transpose of the map (another op)."""

    def forward(self, x):
        batch, channels, width, height = x.size()
        proj_query = self.query_conv(x).view(batch, -1, width * height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(batch, -1, width * height)
        attention = self.softmax(torch.bmm(proj_query, proj_key))
        proj_value = self.value_conv(x).view(batch, -1, width * height)
        out = torch.bmm(proj_value, attention).view(batch, channels, width, height)
        return self.gamma * out + x, attention


class ScaledSelfAttn(SelfAttn):
    """HF's structure but logits scaled by 1/sqrt(d): same modules, different math."""

    def forward(self, x):
        _, ch, h, w = x.size()
        theta = self.snconv1x1_theta(x).view(-1, ch // 8, h * w)
        phi = self.maxpool(self.snconv1x1_phi(x)).view(-1, ch // 8, h * w // 4)
        attn = self.softmax(torch.bmm(theta.permute(0, 2, 1), phi) / (ch // 8) ** 0.5)
        g = self.maxpool(self.snconv1x1_g(x)).view(-1, ch // 2, h * w // 4)
        attn_g = torch.bmm(g, attn.permute(0, 2, 1)).view(-1, ch // 2, h, w)
        return x + self.gamma * self.snconv1x1_o_conv(attn_g)


# --- builders for parametrized tests -------------------------------------------------------------


def _seeded(build):
    @functools.wraps(build)
    def wrapper(channels=16, seed=0):
        torch.manual_seed(seed)
        return build(channels)

    return wrapper


FAMILY_BUILDERS = {
    "heykeetae": _seeded(lambda c: Self_Attn(c, "relu")),
    "biggan": _seeded(lambda c: Attention(c)),
    "biggan_num_svs2": _seeded(lambda c: Attention(c, functools.partial(SNConv2d, num_svs=2, num_itrs=2))),
    "studiogan": _seeded(lambda c: SelfAttention(c, True, studiogan_modules("hook"))),
    "studiogan_parametrized_sn": _seeded(lambda c: SelfAttention(c, False, studiogan_modules("parametrization"))),
    "hf_biggan": _seeded(lambda c: SelfAttn(c, eps=1e-4)),
    "voletiv": _seeded(lambda c: VoletivSelfAttn(c)),
    "rosinality": _seeded(lambda c: RosinalitySelfAttention(c)),
    "taki0112": _seeded(lambda c: TakiGoogleAttention(c)),
}

#: family name fastattn should report for each builder
EXPECTED_FAMILY = {
    "heykeetae": "heykeetae",
    "biggan": "biggan",
    "biggan_num_svs2": "biggan",
    "studiogan": "studiogan",
    "studiogan_parametrized_sn": "studiogan",
    "hf_biggan": "hf_biggan",
    "voletiv": "voletiv",
    "rosinality": "rosinality",
    "taki0112": "taki0112",
}

#: families whose original forward runs on odd H or W (the pooled ones reshape with h*w//4)
ODD_SIZES_IN_ORIGINAL = {"heykeetae", "rosinality", "taki0112"}

PARTIAL_MATCHES = {
    "biggan_with_norm": _seeded(lambda c: AttentionWithNorm(c)),
    "heykeetae_old_fork": _seeded(lambda c: OldForkSelfAttn(c, "relu")),
}
# HF's structure with scaled logits is no longer a look-alike: capture by computation swaps it
# with its scale (tests/test_swap_models.py).


def set_residual_scalar(module, value=0.6):
    """gamma / sigma start at 0 (identity layer, no q/k/v gradient): parity tests set it."""
    with torch.no_grad():
        for name in ("gamma", "sigma"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                getattr(module, name).fill_(value)
    return module


def warm_up_spectral_norm(module, steps=5, size=(4, 4)):
    """Run a few training-mode forwards (no grad) so every spectral norm's power iteration has
    converged, as in a trained checkpoint: a fresh torch SN divides by a random-vector estimate
    of sigma, which can blow the weights up and make any fp32 comparison meaningless."""
    channels = next(m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))).in_channels
    param = next(module.parameters())
    training = module.training
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(torch.randn(1, channels, *size, dtype=param.dtype, device=param.device))
    return module.train(training)


# --- small models with several attention sites ---------------------------------------------------


class SmallGenerator(nn.Module):
    """BigGAN-style: z (and y) -> 16x16 image, BigGAN attention at 8x8, HF attention at 16x16."""

    def __init__(self, z_dim=8, ch=16, n_classes=3):
        super().__init__()
        self.ch = ch
        self.linear = nn.Linear(z_dim, ch * 4 * 4)
        self.embed = nn.Embedding(n_classes, ch)
        self.conv1 = nn.utils.spectral_norm(nn.Conv2d(ch, ch, 3, padding=1))
        self.attn1 = Attention(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.attn2 = SelfAttn(ch, eps=1e-4)
        self.to_rgb = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z, y):
        h = self.linear(z).view(-1, self.ch, 4, 4) + self.embed(y)[:, :, None, None]
        h = F.relu(self.conv1(F.interpolate(h, scale_factor=2)))
        h = self.attn1(h, y)
        h = F.relu(self.conv2(F.interpolate(h, scale_factor=2)))
        h = self.attn2(h)
        return torch.tanh(self.to_rgb(h))


class SmallDiscriminator(nn.Module):
    """heykeetae-style D: attention returning maps at 16x16, StudioGAN attention at 8x8, and a
    BigGAN block with an extra norm (a partial match that must stay as it is)."""

    def __init__(self, ch=16, norm_block=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, ch, 3, padding=1)
        self.attn1 = Self_Attn(ch, "relu")
        self.conv2 = nn.utils.parametrizations.spectral_norm(nn.Conv2d(ch, ch, 4, stride=2, padding=1))
        self.attn2 = SelfAttention(ch, False, studiogan_modules("hook"))
        self.block = AttentionWithNorm(ch) if norm_block else nn.Identity()
        self.head = nn.Linear(ch, 1)

    def forward(self, x):
        h = F.leaky_relu(self.conv1(x), 0.1)
        h, p1 = self.attn1(h)
        h = F.leaky_relu(self.conv2(h), 0.1)
        h = self.attn2(h)
        h = self.block(h)
        return self.head(h.sum(dim=(2, 3))).squeeze(1), p1


def residual_scalars_nonzero(model, value=0.6):
    for module in model.modules():
        set_residual_scalar(module, value)
    return model
