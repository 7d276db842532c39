"""Small models for the verify tests, importable by the CLI tests as `verify_models:<factory>`.

`ScaledAttention` computes its attention core in a helper outside its class, so capture by
computation does not see it and only an adapter can swap it: `CORRECT_ADAPTER` describes it
(logits scaled by 1/sqrt(d_qk)), `WRONG_ADAPTER` forgets the scale.
"""
import dataclasses

import torch
from torch import nn

from fastattn import AttentionFamily, register_adapter, swap_attention, unregister_adapter
from fastattn.models import Discriminator, Generator
from fastattn.swap.forward import STATE

CORRECT_ADAPTER = AttentionFamily("scaled_qkv_gain", "q", "k", "v", None, "gain", (), scale=None,
                                  source="tests: ScaledAttention")
WRONG_ADAPTER = dataclasses.replace(CORRECT_ADAPTER, name="scaled_qkv_gain_no_scale", scale=1.0)


def _attend(q, k, v):
    logits = torch.bmm(q.transpose(1, 2), k) * q.shape[1] ** -0.5
    return torch.bmm(v, torch.softmax(logits, dim=-1).transpose(1, 2))


class ScaledAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.q, self.k = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c, c // 4, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        b, c, h, w = x.shape
        out = _attend(self.q(x).flatten(2), self.k(x).flatten(2), self.v(x).flatten(2))
        return x + self.gain * out.view(b, c, h, w)


def scaled_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 1), ScaledAttention(16), nn.ReLU())


def generator(seed=0):
    torch.manual_seed(seed)
    G = Generator(16, ch=8, z_dim=16, attn_resolution=8, attention="naive")
    with torch.no_grad():
        G.attn.gamma.fill_(0.5)  # 0 (its init) would make the layer the identity
    return G


def discriminator(seed=0):
    torch.manual_seed(seed)
    D = Discriminator(16, ch=8, attn_resolution=8, attn_pool=True, attention="naive")
    with torch.no_grad():
        D.attn.gamma.fill_(0.5)
    return D


def tamper(model: nn.Module, name: str, scale: float = 2.0) -> None:
    """After swap_attention: make the swapped layer `name` compute with a wrong logit scale."""
    state = model.get_submodule(name).__dict__[STATE]
    state.family = dataclasses.replace(state.family, scale=scale)


# --- factories for `fastattn verify --model verify_models:<name>` ---------------------------------

def make_wrong_adapter_model():
    """A user who registered a wrong adapter (their module registers it on import)."""
    register_adapter(WRONG_ADAPTER, replace=True)
    return scaled_model()


def make_tampered_model():
    model = scaled_model()
    register_adapter(CORRECT_ADAPTER, replace=True)
    try:
        swap_attention(model)
    finally:
        unregister_adapter(CORRECT_ADAPTER.name)
    tamper(model, "1")
    return model


def make_raises():
    raise ValueError("checkpoint G.pt not found")


def make_not_a_model():
    return {"G": 1}
