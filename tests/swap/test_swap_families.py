"""swap_attention on each layer family of GAN_LAYERS.md: swapped vs the user's original forward.

Every family replica (tests/swap/gan_families.py) is built, its residual scalar set non-zero, deep
copied and the copy swapped; both then see the same input in fp64 and fp32, train and eval mode:
outputs, attention rows, the gradients of the input and of every parameter, the spectral-norm
buffers after a training step, and the state_dict both ways must agree.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.reference import reference_attention
from fastattn.swap import is_swapped
from fastattn.testing import assert_close
from gan_families import (EXPECTED_FAMILY, FAMILY_BUILDERS, ODD_SIZES_IN_ORIGINAL,
                          set_residual_scalar, warm_up_spectral_norm)

CHANNELS = 16
SIZES = {"even": (6, 8), "odd": (5, 7)}


def _cases():
    for family in sorted(FAMILY_BUILDERS):
        for size in SIZES:
            if size == "odd" and family not in ODD_SIZES_IN_ORIGINAL:
                continue
            yield family, size


def _original_and_swapped(family, dtype, training):
    original = warm_up_spectral_norm(set_residual_scalar(FAMILY_BUILDERS[family](CHANNELS).to(dtype)))
    original.train(training)
    swapped = copy.deepcopy(original)
    handle = fastattn.swap_attention(swapped, backend="torch", strict=True)
    return original, swapped, handle


def _split(result):
    return result if isinstance(result, tuple) else (result, None)


def _assert_same_gradients(original, swapped, out_orig, out_swap, x_orig, x_swap, suffix=""):
    """Backpropagate one random gradient through both; the input's and every parameter's
    gradients must agree."""
    grad = torch.randn_like(out_orig)
    out_orig.backward(grad)
    out_swap.backward(grad)
    assert_close(x_swap.grad, x_orig.grad, name="grad of x")
    swapped_params = dict(swapped.named_parameters())
    for name, param in original.named_parameters():
        assert_close(swapped_params[name].grad, param.grad, name=f"grad of {name}{suffix}")


@pytest.mark.parametrize("family, size", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_swapped_family_matches_original_outputs_gradients_and_sn_state(family, size, dtype, training):
    original, swapped, handle = _original_and_swapped(family, dtype, training)
    assert [(s.name, s.family) for s in handle.swapped] == [("", EXPECTED_FAMILY[family])]
    torch.manual_seed(1)
    x = torch.randn(2, CHANNELS, *SIZES[size], dtype=dtype)
    x_orig, x_swap = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_orig, attn_orig = _split(original(x_orig))
    out_swap, attn_swap = _split(swapped(x_swap))
    assert_close(out_swap, out_orig, name=f"{family} output")
    if attn_orig is not None:
        assert isinstance(attn_swap, fastattn.AttentionMap)
        assert attn_swap.shape == attn_orig.shape
        assert_close(attn_swap[1, 5], attn_orig[1, 5], name="attention row (1, 5)")
        assert_close(attn_swap.materialize(), attn_orig, name="attention map")
    _assert_same_gradients(original, swapped, out_orig, out_swap, x_orig, x_swap)
    # one optimizer step, then the spectral-norm state and the next output must still agree
    for module in (original, swapped):
        torch.optim.SGD(module.parameters(), lr=0.01).step()
    state_orig, state_swap = original.state_dict(), swapped.state_dict()
    assert list(state_swap) == list(state_orig)
    for key, value in state_orig.items():
        assert_close(state_swap[key], value, name=f"state_dict[{key!r}] after a step")
    with torch.no_grad():
        assert_close(_split(swapped(x))[0], _split(original(x))[0], name="output after a step")


@pytest.mark.parametrize("family", sorted(FAMILY_BUILDERS))
def test_state_dict_round_trips_both_ways_between_original_and_swapped(family):
    original, swapped, _ = _original_and_swapped(family, torch.float64, True)
    fresh = set_residual_scalar(FAMILY_BUILDERS[family](CHANNELS, seed=7).double(), 0.3)
    fastattn.swap_attention(fresh, backend="torch")
    fresh.load_state_dict(original.state_dict())  # original checkpoint -> swapped model
    for key, value in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    plain = FAMILY_BUILDERS[family](CHANNELS, seed=9).double()
    plain.load_state_dict(swapped.state_dict())  # swapped checkpoint -> original model
    assert list(plain.state_dict()) == list(swapped.state_dict())


@pytest.mark.parametrize("family", ["biggan", "studiogan", "hf_biggan", "voletiv"])
def test_swapped_pooled_layers_accept_odd_sizes_with_floor_pooling(family):
    _, swapped, _ = _original_and_swapped(family, torch.float64, False)
    names = {"biggan": ("theta", "phi", "g", "o", "gamma"),
             "studiogan": ("conv1x1_theta", "conv1x1_phi", "conv1x1_g", "conv1x1_attn", "sigma"),
             "hf_biggan": ("snconv1x1_theta", "snconv1x1_phi", "snconv1x1_g", "snconv1x1_o_conv", "gamma"),
             "voletiv": ("snconv1x1_theta", "snconv1x1_phi", "snconv1x1_g", "snconv1x1_attn", "sigma")}
    theta, phi, g, o, scalar = (getattr(swapped, n) for n in names[family])
    x = torch.randn(2, CHANNELS, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        got = swapped(x)
        q = theta(x).flatten(2)
        k, v = (F.max_pool2d(conv(x), 2).flatten(2) for conv in (phi, g))
        want = x + scalar * o(reference_attention(q, k, v).view(2, -1, 7, 5))
    assert k.shape[2] == 3 * 2
    assert_close(got, want, name=f"{family} on 7x5")


def test_taki0112_port_keeps_tf_same_pooling_on_odd_sizes():
    original, swapped, _ = _original_and_swapped("taki0112", torch.float64, False)
    x = torch.randn(1, CHANNELS, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        assert_close(swapped(x), original(x), name="ceil-mode pooled output")


def test_revert_restores_the_class_forward_and_the_original_outputs():
    original, swapped, handle = _original_and_swapped("hf_biggan", torch.float64, False)
    assert is_swapped(swapped) and "forward" in swapped.__dict__
    assert handle.revert() == [""]
    assert not is_swapped(swapped) and "forward" not in swapped.__dict__
    x = torch.randn(2, CHANNELS, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(swapped(x), original(x))
    assert handle.revert() == []


def test_swapping_twice_changes_nothing():
    _, swapped, first = _original_and_swapped("biggan", torch.float64, False)
    forward = swapped.__dict__["forward"]
    second = fastattn.swap_attention(swapped, strict=True)
    assert second.swapped == [] and [(s.name, s.family) for s in second.already_swapped] == [("", "biggan")]
    assert swapped.__dict__["forward"] is forward
    assert second.revert() == [] and is_swapped(swapped)
    assert first.revert() == [""]


def test_swapped_forward_keeps_the_original_signature_and_keyword_calls():
    import inspect

    _, swapped, _ = _original_and_swapped("biggan", torch.float64, False)
    assert str(inspect.signature(swapped.forward)) == "(x, y=None)"
    x = torch.randn(1, CHANNELS, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(swapped(x, torch.zeros(1)), swapped(x=x))
    with pytest.raises(TypeError):
        swapped(x, None, None)


def test_heykeetae_attention_map_holds_no_n_by_m_tensor_until_indexed():
    _, swapped, _ = _original_and_swapped("heykeetae", torch.float32, False)
    out, amap = swapped(torch.randn(2, CHANNELS, 6, 6))
    assert amap.shape == (2, 36, 36) and len(amap) == 2
    held = [t for t in vars(amap).values() if isinstance(t, torch.Tensor)]
    assert sum(t.numel() for t in held) < 2 * 36 * 36, "the map keeps an N x M sized tensor"
    assert amap.q.shape == (2, CHANNELS // 8, 36) and amap.lse.shape == (2, 36)
    row = amap[0, 7]
    assert row.shape == (36,) and abs(float(row.detach().sum()) - 1) < 1e-5


def _uses_hook_spectral_norm(module):
    from torch.nn.utils.spectral_norm import SpectralNorm

    return any(isinstance(hook, SpectralNorm) for m in module.modules() for hook in m._forward_pre_hooks.values())


HOOK_SN_FAMILIES = sorted(f for f, build in FAMILY_BUILDERS.items() if _uses_hook_spectral_norm(build(CHANNELS)))


def test_hook_spectral_norm_families_are_the_expected_ones():
    assert HOOK_SN_FAMILIES == ["hf_biggan", "rosinality", "studiogan", "voletiv"]


@pytest.mark.parametrize("family", HOOK_SN_FAMILIES)
def test_hook_sn_layer_is_swapped_after_a_forward_backward_with_grad_and_matches_original(family):
    # torch.nn.utils.spectral_norm leaves a non-leaf `weight` on each conv after a forward with
    # grad enabled: the probe's copy must cope with it, not skip the layer
    original, swapped = (warm_up_spectral_norm(set_residual_scalar(FAMILY_BUILDERS[family](CHANNELS).double()))
                         for _ in range(2))
    x = torch.randn(2, CHANNELS, 6, 8, dtype=torch.float64)
    for module in (original, swapped):
        module.train()
        _split(module(x))[0].square().sum().backward()
    assert any(not t.is_leaf for m in swapped.modules() for t in vars(m).values() if isinstance(t, torch.Tensor))
    handle = fastattn.swap_attention(swapped, backend="torch", strict=True)
    assert [(s.name, s.family) for s in handle.swapped] == [("", EXPECTED_FAMILY[family])]
    assert handle.skipped == [] and is_swapped(swapped)
    for training in (True, False):
        original.train(training)
        swapped.train(training)
        x = torch.randn(2, CHANNELS, 6, 8, dtype=torch.float64)
        assert_close(_split(swapped(x))[0], _split(original(x))[0], name=f"{family} output (train={training})")


@pytest.mark.parametrize("hw", [(1, 5), (3, 1), (1, 1)])
def test_taki0112_ceil_pooling_accepts_a_size_one_side_like_the_original(hw):
    original, swapped, _ = _original_and_swapped("taki0112", torch.float64, False)
    x = torch.randn(2, CHANNELS, *hw, dtype=torch.float64)
    with torch.no_grad():
        want = original(x)
        assert_close(swapped(x), want, name=f"taki0112 on {hw}")


# --- the probe also runs in training mode -------------------------------------------------------
# A user's forward can do arithmetic only in training (a dropout on the attention map, say), with
# no extra child module for the structural match to see. The eval-mode probe cannot see it; the
# training-mode probe (two copies, same fixed RNG state) does.
from gan_families import SelfAttn  # noqa: E402


class DropoutForkSelfAttn(SelfAttn):
    """The HF BigGAN layer with F.dropout(attn, p, self.training) on the attention map."""

    def __init__(self, in_channels, p=0.1):
        super().__init__(in_channels)
        self.p = p

    def forward(self, x):
        _, ch, h, w = x.size()
        theta = self.snconv1x1_theta(x).view(-1, ch // 8, h * w)
        phi = self.maxpool(self.snconv1x1_phi(x)).view(-1, ch // 8, h * w // 4)
        attn = self.softmax(torch.bmm(theta.permute(0, 2, 1), phi))
        attn = F.dropout(attn, self.p, self.training)
        g = self.maxpool(self.snconv1x1_g(x)).view(-1, ch // 2, h * w // 4)
        attn_g = torch.bmm(g, attn.permute(0, 2, 1)).view(-1, ch // 2, h, w)
        attn_g = self.snconv1x1_o_conv(attn_g)
        return x + self.gamma * attn_g


class TrainOnlyNoOpSelfAttn(SelfAttn):
    """The HF BigGAN layer with a training-only branch that changes nothing."""

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            out = out * 1.0 + 0.0
        return out


def _built(cls, *args, dtype=torch.float64):
    torch.manual_seed(0)
    return warm_up_spectral_norm(set_residual_scalar(cls(*args).to(dtype)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fork_with_dropout_on_the_attention_in_training_is_not_swapped(training):
    module = _built(DropoutForkSelfAttn, CHANNELS, 0.1).train(training)
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="training"):
        handle = fastattn.swap_attention(module, backend="torch")
    assert handle.swapped == [] and not is_swapped(module)
    assert torch.equal(torch.get_rng_state(), rng), "the probe changed the caller's RNG state"
    [skipped] = handle.skipped
    reason = " ".join(skipped.reasons["hf_biggan"])
    assert "training" in reason and "dropout" in reason, reason


@pytest.mark.parametrize("cls, args", [(DropoutForkSelfAttn, (CHANNELS, 0.0)), (TrainOnlyNoOpSelfAttn, (CHANNELS,))],
                         ids=["dropout_p0", "train_only_noop"])
def test_fork_whose_training_only_code_changes_nothing_is_swapped(cls, args):
    original = _built(cls, *args)
    swapped = copy.deepcopy(original)
    handle = fastattn.swap_attention(swapped, backend="torch", strict=True)
    assert [(s.name, s.family) for s in handle.swapped] == [("", "hf_biggan")] and handle.skipped == []
    for training in (True, False):
        original.train(training)
        swapped.train(training)
        x = torch.randn(2, CHANNELS, 6, 8, dtype=torch.float64)
        assert_close(swapped(x), original(x), name=f"{cls.__name__} output (train={training})")


@pytest.mark.parametrize("family", ["biggan", "studiogan"])
@pytest.mark.parametrize("warm", [True, False], ids=["warm_sn", "fresh_sn"])
def test_training_probe_leaves_the_module_untouched_and_training_matches_the_original(family, warm):
    # the training-mode probe runs BigGAN's own SN (u0/sv0) and torch's SN power iteration on
    # copies only: the swapped module's buffers, and the caller's RNG, are as they were
    built = set_residual_scalar(FAMILY_BUILDERS[family](CHANNELS).double())
    original = warm_up_spectral_norm(built) if warm else built
    original.train()
    swapped = copy.deepcopy(original)
    rng = torch.get_rng_state()
    handle = fastattn.swap_attention(swapped, backend="torch", strict=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [(s.name, s.family) for s in handle.swapped] == [("", EXPECTED_FAMILY[family])]
    state_orig, state_swap = original.state_dict(), swapped.state_dict()
    assert list(state_swap) == list(state_orig)
    for key, value in state_orig.items():
        assert torch.equal(state_swap[key], value), f"the probe changed {key}"
    for step in range(2):
        x = torch.randn(2, CHANNELS, 6, 8, dtype=torch.float64)
        x_orig, x_swap = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_orig, out_swap = _split(original(x_orig))[0], _split(swapped(x_swap))[0]
        assert_close(out_swap, out_orig, name=f"{family} train output, step {step}")
        _assert_same_gradients(original, swapped, out_orig, out_swap, x_orig, x_swap, f", step {step}")
        swapped_buffers = dict(swapped.named_buffers())
        for name, buf in original.named_buffers():
            assert_close(swapped_buffers[name], buf, name=f"buffer {name} after step {step}")
        for module in (original, swapped):
            torch.optim.SGD(module.parameters(), lr=0.01).step()
            module.zero_grad()


from gan_families import Attention, set_residual_scalar  # noqa: E402


class AttentionUsingY(Attention):
    """BigGAN's structure (theta, phi, g, o, gamma; forward(x, y=None)) whose forward USES y."""

    def forward(self, x, y=None):
        out = super().forward(x)
        return out if y is None else out + y[:, :, None, None]


def test_layer_whose_forward_uses_its_extra_argument_is_never_swapped_unverified():
    """Issue #16, item 2: the family probe called forward(x) only, so this layer was swapped as
    biggan and then ignored y (output off by y). It must be verified with a y."""
    torch.manual_seed(0)
    layer = set_residual_scalar(AttentionUsingY(16).double())
    original = AttentionUsingY(16).double()
    original.load_state_dict(layer.state_dict())
    with pytest.warns(UserWarning, match="its forward computes something other than the biggan layer"):
        handle = fastattn.swap_attention(layer, backend="torch")
    assert all(s.family != "biggan" for s in handle.swapped), handle.summary()
    x, y = torch.randn(2, 16, 6, 4, dtype=torch.float64), torch.full((2, 16), 2.0, dtype=torch.float64)
    layer.eval(), original.eval()
    with torch.no_grad():
        assert_close(layer(x, y), original(x, y), name="output with y")
        assert_close(layer(x), original(x), name="output without y")
