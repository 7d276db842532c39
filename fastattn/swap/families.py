"""The attention-layer families of ../shared/GAN_LAYERS.md, described by structure, and the matcher.

An `AttentionFamily` names the submodules and the residual scalar of one layer family and the
few facts its forward hard-codes (pooling, roles, return value, signature). `match(module)`
decides from structure alone (names, types and shapes of the direct children, parameters and
buffers, and the forward signature) whether a module is exactly such a layer; it never imports
the user's code. Anything beyond the family's set (an extra norm, a bias parameter, a buffer)
means "not this family": fastattn cannot know where an unknown child runs in the user's
forward, and a layer is never dropped or reordered. Users describe such variants with
`fastattn.register_adapter(AttentionFamily(...))`.

Structure cannot see extra arithmetic inside a user's forward; `fastattn.swap` therefore also
runs a small probe comparing the original forward with the swapped one before it swaps.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

__all__ = ["AttentionFamily", "BUILTIN_FAMILIES", "Match", "match", "register_adapter",
           "unregister_adapter", "families"]

_POOLS = (None, "floor", "ceil")


@dataclass(frozen=True)
class AttentionFamily:
    """How one attention-layer family is built and what its forward computes.

    query, key, value: names of the 1x1 convs giving q (B, d_qk, N), k, v.
    out: name of the output 1x1 conv (d_v -> C), or None (then d_v == C).
    scalar: name of the residual scalar parameter; scalar_shape its shape ((), (1,)) or None
        for either. The layer returns x + scalar * out(attention).
    pool: how the forward pools keys and values when it calls no pooling child: None (no
        pooling), "floor" (F.max_pool2d 2x2, floor) or "ceil" (TF "SAME": odd sizes round up).
    pool_module: name of an nn.MaxPool2d child the forward applies to keys and values (it is
        called, so its own settings apply); overrides `pool`.
    conv_dim: 2 (Conv2d on the map) or 1 (Conv1d on the flattened map).
    roles_swapped: the forward takes softmax over queries (dim 1 of the (B, N, N) logits), i.e.
        the key conv's output plays the query and the query conv's output the key.
    returns_attention: the forward returns (out, attention) with the (B, N, M) map.
    extra_forward_args: optional arguments after x that the forward ignores (BigGAN's y=None).
    unused_children: children the forward may hold but does not call (heykeetae's
        nn.Softmax(dim=-1)); optional; a child named "softmax" must be an nn.Softmax over the
        last dimension.
    after_residual: children applied, in order, to the layer's output (for adapters).
    scale: logit scale (1.0: GAN layers do not scale; None: 1/sqrt(d_qk)).
    """

    name: str
    query: str
    key: str
    value: str
    out: str | None
    scalar: str
    scalar_shape: tuple[int, ...] | None = None
    pool: str | None = None
    pool_module: str | None = None
    conv_dim: int = 2
    roles_swapped: bool = False
    returns_attention: bool = False
    extra_forward_args: int = 0
    unused_children: tuple[str, ...] = ()
    after_residual: tuple[str, ...] = ()
    scale: float | None = 1.0
    source: str = ""
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        shape = self.scalar_shape
        if shape is not None and not (isinstance(shape, tuple) and all(
                isinstance(n, int) and not isinstance(n, bool) and n == 1 for n in shape)):
            raise ValueError("scalar_shape must be None or the shape of a one-element residual scalar, "
                             f"a tuple of 1s such as () or (1,), got {shape!r}")
        if self.pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {self.pool!r}")
        if self.conv_dim not in (1, 2):
            raise ValueError(f"conv_dim must be 1 or 2, got {self.conv_dim!r}")
        if self.conv_dim == 1 and (self.pool or self.pool_module):
            raise ValueError("conv_dim=1 families work on the flattened map and cannot pool 2x2")
        names = [n for n in (self.query, self.key, self.value, self.out, self.pool_module) if n]
        names += [*self.unused_children, *self.after_residual]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name!r} names a child twice: {names}")

    @property
    def convs(self) -> tuple[str, ...]:
        return tuple(n for n in (self.query, self.key, self.value, self.out) if n)

    @property
    def children(self) -> set[str]:
        return {*self.convs, *filter(None, [self.pool_module]), *self.unused_children,
                *self.after_residual}

    @property
    def pooled(self) -> bool:
        return bool(self.pool or self.pool_module)


BUILTIN_FAMILIES: tuple[AttentionFamily, ...] = (
    AttentionFamily("heykeetae", "query_conv", "key_conv", "value_conv", None, "gamma", (1,),
                    returns_attention=True, unused_children=("softmax",),
                    source="heykeetae/Self-Attention-GAN Self_Attn"),
    AttentionFamily("biggan", "theta", "phi", "g", "o", "gamma", (), pool="floor",
                    extra_forward_args=1, source="ajbrock/BigGAN-PyTorch Attention"),
    AttentionFamily("studiogan", "conv1x1_theta", "conv1x1_phi", "conv1x1_g", "conv1x1_attn",
                    "sigma", (1,), pool_module="maxpool", unused_children=("softmax",),
                    source="POSTECH-CVLab/PyTorch-StudioGAN SelfAttention"),
    AttentionFamily("hf_biggan", "snconv1x1_theta", "snconv1x1_phi", "snconv1x1_g",
                    "snconv1x1_o_conv", "gamma", (1,), pool_module="maxpool",
                    unused_children=("softmax",),
                    source="huggingface/pytorch-pretrained-BigGAN SelfAttn"),
    AttentionFamily("voletiv", "snconv1x1_theta", "snconv1x1_phi", "snconv1x1_g",
                    "snconv1x1_attn", "sigma", (1,), pool_module="maxpool",
                    unused_children=("softmax",),
                    source="voletiv/self-attention-GAN-pytorch Self_Attn (StudioGAN math, bias)"),
    AttentionFamily("rosinality", "query", "key", "value", None, "gamma", (), conv_dim=1,
                    roles_swapped=True, source="rosinality/sagan-pytorch SelfAttention"),
    AttentionFamily("taki0112", "g_conv", "f_conv", "h_conv", "attn_conv", "gamma", (1,),
                    pool="ceil", source="PyTorch ports of taki0112's TF google_attention"),
)

_ADAPTERS: list[AttentionFamily] = []


def register_adapter(family: AttentionFamily, *, replace: bool = False) -> AttentionFamily:
    """Teach `swap_attention` a layer variant. Adapters are tried before the built-in families,
    newest first. Returns the family; `unregister_adapter(name)` removes it."""
    if not isinstance(family, AttentionFamily):
        raise TypeError(f"family must be a fastattn.AttentionFamily, got {type(family).__name__}")
    known = {f.name for f in families()}
    if family.name in known and not replace:
        raise ValueError(f"a family named {family.name!r} is already registered; pass replace=True "
                         f"or pick another name (registered: {sorted(known)})")
    unregister_adapter(family.name, missing_ok=True)
    _ADAPTERS.insert(0, family)
    return family


def unregister_adapter(name: str, *, missing_ok: bool = False) -> None:
    for i, family in enumerate(_ADAPTERS):
        if family.name == name:
            del _ADAPTERS[i]
            return
    if not missing_ok:
        raise ValueError(f"no adapter named {name!r} (adapters: {[f.name for f in _ADAPTERS]})")


def families() -> tuple[AttentionFamily, ...]:
    """Every family `swap_attention` recognises, in the order it tries them."""
    return (*_ADAPTERS, *BUILTIN_FAMILIES)


@dataclass
class Match:
    family: AttentionFamily
    reasons: list[str]

    @property
    def ok(self) -> bool:
        return not self.reasons


def _conv_reasons(family: AttentionFamily, module: nn.Module) -> list[str]:
    conv_type = nn.Conv2d if family.conv_dim == 2 else nn.Conv1d
    reasons, convs = [], {}
    for name in family.convs:
        conv = getattr(module, name)
        if not isinstance(conv, conv_type):
            reasons.append(f"{name} is a {type(conv).__name__}, expected an nn.{conv_type.__name__}")
            continue
        bad = [f"{attr}={getattr(conv, attr)}" for attr, good in
               (("kernel_size", 1), ("stride", 1), ("dilation", 1)) if set(getattr(conv, attr)) != {good}]
        if conv.groups != 1:
            bad.append(f"groups={conv.groups}")
        if conv.padding not in ("valid", "same") and set(conv.padding) != {0}:
            bad.append(f"padding={conv.padding}")
        if bad:
            reasons.append(f"{name} is not a plain 1x1 conv ({', '.join(bad)})")
        convs[name] = conv
    if reasons:
        return reasons
    q, k, v = convs[family.query], convs[family.key], convs[family.value]
    channels = q.in_channels
    for name in (family.key, family.value):
        if convs[name].in_channels != channels:
            reasons.append(f"{name} reads {convs[name].in_channels} channels but {family.query} reads {channels}")
    if k.out_channels != q.out_channels:
        reasons.append(f"{family.key} gives {k.out_channels} channels but {family.query} gives "
                       f"{q.out_channels}: q and k must share d_qk")
    if family.out:
        o = convs[family.out]
        if (o.in_channels, o.out_channels) != (v.out_channels, channels):
            reasons.append(f"{family.out} maps {o.in_channels}->{o.out_channels} channels, expected "
                           f"{v.out_channels}->{channels} (d_v -> C)")
    elif v.out_channels != channels:
        reasons.append(f"{family.value} gives {v.out_channels} channels but without an output conv "
                       f"d_v must equal C={channels}")
    return reasons


def _child_reasons(family: AttentionFamily, module: nn.Module) -> list[str]:
    reasons = []
    present = {name for name, _ in module.named_children()}
    # unused children (a softmax module the forward never calls) may be there or not
    extra = sorted(present - family.children)
    missing = sorted(family.children - present - set(family.unused_children))
    if extra:
        reasons.append(f"has submodules {extra} that the {family.name} layer does not have; "
                       "fastattn cannot know where they run in your forward (describe the variant "
                       "with fastattn.register_adapter)")
    if missing:
        reasons.append(f"lacks submodules {missing} of the {family.name} layer")
    if family.pool_module and family.pool_module in present:
        pool = getattr(module, family.pool_module)
        ok = (isinstance(pool, nn.MaxPool2d) and not pool.return_indices
              and nn.modules.utils._pair(pool.kernel_size) == (2, 2)
              and nn.modules.utils._pair(pool.stride or pool.kernel_size) == (2, 2)
              and nn.modules.utils._pair(pool.padding) == (0, 0)
              and nn.modules.utils._pair(pool.dilation) == (1, 1))
        if not ok:
            reasons.append(f"{family.pool_module} is {pool!r}, expected nn.MaxPool2d(2, stride=2, padding=0)")
    softmax = getattr(module, "softmax", None) if "softmax" in family.unused_children else None
    if softmax is not None and not (isinstance(softmax, nn.Softmax) and softmax.dim in (-1, 2)):
        reasons.append(f"softmax is {softmax!r}, expected nn.Softmax(dim=-1) (softmax over keys)")
    return reasons


def _tensor_reasons(family: AttentionFamily, module: nn.Module) -> list[str]:
    reasons = []
    params = dict(module.named_parameters(recurse=False))
    buffers = dict(module.named_buffers(recurse=False))
    extra = sorted(set(params) - {family.scalar})
    if extra:
        reasons.append(f"has parameters {extra} beyond the residual scalar {family.scalar!r}")
    if buffers:
        reasons.append(f"has buffers {sorted(buffers)} that the {family.name} layer does not have")
    scalar = params.get(family.scalar)
    if scalar is None:
        reasons.append(f"lacks the residual scalar parameter {family.scalar!r}")
    elif scalar.numel() != 1 or (family.scalar_shape is not None
                                 and tuple(scalar.shape) != tuple(family.scalar_shape)):
        want = family.scalar_shape if family.scalar_shape is not None else "one element"
        reasons.append(f"{family.scalar} has shape {tuple(scalar.shape)}, expected {want}")
    return reasons


def forward_signature(module: nn.Module) -> inspect.Signature:
    """The signature of the module class's own forward, without self."""
    return inspect.signature(type(module).forward.__get__(module))


def _signature_reasons(family: AttentionFamily, module: nn.Module) -> list[str]:
    try:
        sig = forward_signature(module)
    except (TypeError, ValueError) as error:
        return [f"its forward signature cannot be read ({error})"]
    params = list(sig.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ok = (len(params) == 1 + family.extra_forward_args
          and all(p.kind in positional for p in params)
          and params[0].default is inspect.Parameter.empty
          and all(p.default is not inspect.Parameter.empty for p in params[1:]))
    if not ok:
        want = "(x" + "".join(f", arg{i}=None" for i in range(family.extra_forward_args)) + ")"
        return [f"forward{sig} does not have the {family.name} signature forward{want}"]
    return []


def match(module: nn.Module) -> list[Match]:
    """Every family whose conv and scalar names `module` carries, with the reasons (if any) it is
    not exactly that family. An empty list means the module is not an attention layer at all."""
    found = []
    for family in families():
        if not all(isinstance(getattr(module, n, None), nn.Module) for n in family.convs):
            continue
        if family.scalar not in dict(module.named_parameters(recurse=False)):
            continue
        reasons = _child_reasons(family, module) + _tensor_reasons(family, module)
        reasons += _conv_reasons(family, module)
        reasons += _signature_reasons(family, module)
        found.append(Match(family, reasons))
    return found
