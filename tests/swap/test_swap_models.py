"""swap_attention on whole models: several sites, partial matches, adapters, strict, backends."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import fastattn
from fastattn import AttentionFamily, register_adapter, swap_attention, unregister_adapter
from fastattn.dispatch import _REGISTRY, Backend, BackendUnavailableError, register_backend
from fastattn.swap import is_swapped
from fastattn.swap.families import families, match
from fastattn.swap.probe import probe
from fastattn.testing import assert_close
from gan_families import (PARTIAL_MATCHES, Attention, AttentionWithNorm, ScaledSelfAttn, Self_Attn,
                          SmallDiscriminator, SmallGenerator, residual_scalars_nonzero,
                          set_residual_scalar, warm_up_spectral_norm)

BIGGAN_WITH_NORM = AttentionFamily(
    "biggan_with_norm", "theta", "phi", "g", "o", "gamma", (), pool="floor", extra_forward_args=1,
    after_residual=("norm",), source="tests/swap/gan_families.py AttentionWithNorm")


@pytest.fixture
def adapter():
    family = register_adapter(BIGGAN_WITH_NORM)
    yield family
    unregister_adapter(family.name)


def _models():
    torch.manual_seed(0)
    gen = residual_scalars_nonzero(SmallGenerator().double())
    disc = residual_scalars_nonzero(SmallDiscriminator().double())
    return gen, disc


def _inputs():
    torch.manual_seed(3)
    return torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])


def _loss(gen, disc, z, y):
    image = gen(z, y)
    score, attention = disc(image)
    return score.mean() + 0.1 * attention[0, 3].square().sum(), image


def test_generator_and_discriminator_sites_are_swapped_partial_match_skipped_and_reverted():
    gen, disc = _models()
    gen_ref, disc_ref = copy.deepcopy(gen), copy.deepcopy(disc)
    h_gen = swap_attention(gen, backend="torch", strict=True)
    with pytest.warns(UserWarning, match=r"block \(AttentionWithNorm\) not swapped.*'norm'"):
        h_disc = swap_attention(disc, backend="torch", strict=True)
    assert [(s.name, s.family) for s in h_gen.swapped] == [("attn1", "biggan"), ("attn2", "hf_biggan")]
    assert [(s.name, s.family) for s in h_disc.swapped] == [("attn1", "heykeetae"), ("attn2", "studiogan")]
    assert [s.name for s in h_disc.skipped] == ["block"] and not is_swapped(disc.block)
    assert "norm" in str(h_disc.skipped[0]) and "block" in h_disc.summary()

    z, y = _inputs()
    loss, image = _loss(gen, disc, z, y)
    loss_ref, image_ref = _loss(gen_ref, disc_ref, z, y)
    assert_close(image, image_ref, name="generated image")
    assert_close(loss, loss_ref, name="loss")
    loss.backward()
    loss_ref.backward()
    for model, ref in ((gen, gen_ref), (disc, disc_ref)):
        ref_params = dict(ref.named_parameters())
        for name, param in model.named_parameters():
            assert_close(param.grad, ref_params[name].grad, name=f"grad of {name}")
        ref_state = ref.state_dict()
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                assert_close(value, ref_state[key], name=f"state {key}")
            else:
                assert torch.equal(value, ref_state[key]), key

    assert sorted(h_gen.revert() + h_disc.revert()) == ["attn1", "attn1", "attn2", "attn2"]
    assert not any(is_swapped(m) for m in [*gen.modules(), *disc.modules()])
    with torch.no_grad():
        assert torch.equal(_loss(gen, disc, z, y)[0], _loss(gen_ref, disc_ref, z, y)[0])


def test_recording_collects_attention_maps_of_every_site_call():
    gen, _ = _models()
    handle = swap_attention(gen, backend="torch")
    z, y = _inputs()
    with torch.no_grad(), handle.recording() as maps:
        gen(z, y)
    assert sorted(maps) == ["attn1", "attn2"]
    assert maps["attn1"][0].shape == (4, 64, 16) and maps["attn2"][0].key_hw == (8, 8)
    assert_close(maps["attn2"][0][2].sum(dim=-1), torch.ones(256, dtype=torch.float64), name="row sums")
    with torch.no_grad():
        gen(z, y)
    assert len(maps["attn1"]) == 1  # recording stopped at the end of the block


def test_adapter_swaps_a_variant_with_a_norm_after_the_residual(adapter):
    torch.manual_seed(0)
    block = set_residual_scalar(AttentionWithNorm(16).double())
    reference = copy.deepcopy(block)
    handle = swap_attention(block, backend="torch", strict=True)
    assert [(s.name, s.family) for s in handle.swapped] == [("", "biggan_with_norm")]
    x = torch.randn(3, 16, 6, 6, dtype=torch.float64)
    assert_close(block(x, None), reference(x, None), name="train-mode output (batch norm)")
    assert_close(block.norm.running_mean, reference.norm.running_mean, name="running mean")
    block.eval(), reference.eval()
    assert_close(block(x), reference(x), name="eval output")


def test_scaled_logits_are_refused_by_the_family_captured_with_their_scale_or_taken_by_an_adapter():
    scaled = warm_up_spectral_norm(set_residual_scalar(ScaledSelfAttn(16).double())).eval()
    failure, _ = probe(scaled, next(f for f in families() if f.name == "hf_biggan"))
    assert "computes something other than the hf_biggan layer" in failure
    captured = copy.deepcopy(scaled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = swap_attention(captured, backend="torch").swapped
    assert [s.family for s in records] == ["traced"] and "scale 0.7071" in records[0].pattern
    x = torch.randn(2, 16, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        assert_close(captured(x), scaled(x), name="captured scaled-logit output")
    family = register_adapter(AttentionFamily(
        "hf_scaled", "snconv1x1_theta", "snconv1x1_phi", "snconv1x1_g", "snconv1x1_o_conv",
        "gamma", (1,), pool_module="maxpool", unused_children=("softmax",), scale=None))
    try:
        swapped = copy.deepcopy(scaled)
        assert [s.family for s in swap_attention(swapped, backend="torch").swapped] == ["hf_scaled"]
        x = torch.randn(2, 16, 4, 6, dtype=torch.float64)
        with torch.no_grad():
            assert_close(swapped(x), scaled(x), name="scaled-logit output")
    finally:
        unregister_adapter(family.name)


@pytest.mark.parametrize("name", sorted(PARTIAL_MATCHES))
def test_partial_matches_are_left_alone_with_the_reason(name):
    module = PARTIAL_MATCHES[name](16).double()
    before = dict(vars(module))
    with pytest.warns(UserWarning, match="not swapped"):
        handle = swap_attention(module)
    assert handle.swapped == [] and len(handle.skipped) == 1
    assert handle.skipped[0].reasons and vars(module).keys() == before.keys()
    with pytest.raises(LookupError, match="found no attention layer") as error:
        swap_attention(module, strict=True)
    assert "not swapped" in str(error.value)


def test_verify_false_is_what_lets_a_different_op_through():
    old_fork = PARTIAL_MATCHES["heykeetae_old_fork"](16)
    assert [s.family for s in swap_attention(old_fork, verify=False).swapped] == ["heykeetae"]


def test_extra_parameter_or_buffer_means_not_the_family_and_capture_takes_the_layer():
    layer = Self_Attn(16, "relu")
    layer.beta = nn.Parameter(torch.zeros(1))
    layer.register_buffer("step", torch.zeros(()))
    (found,) = match(layer)
    assert "['beta']" in str(found.reasons) and "['step']" in str(found.reasons)
    assert [s.family for s in swap_attention(layer).swapped] == ["traced"]


def test_instance_forward_patched_by_other_code_is_not_overwritten():
    layer = Self_Attn(16, "relu")
    layer.forward = lambda x: x
    with pytest.warns(UserWarning, match="already replaced"):
        assert swap_attention(layer).swapped == []


def test_strict_raises_when_the_model_has_no_attention_layer():
    with pytest.raises(LookupError, match="no module has the structure of a known family"):
        swap_attention(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU()), strict=True)
    assert swap_attention(nn.Sequential(nn.Conv2d(3, 8, 1))).swapped == []


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        swap_attention("G")
    with pytest.raises(ValueError, match="backend must be one of"):
        swap_attention(Self_Attn(16, "relu"), backend="cuda-magic")
    with pytest.raises(TypeError, match="strict must be a bool"):
        swap_attention(Self_Attn(16, "relu"), strict="yes")
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(AttentionFamily("biggan", "a", "b", "c", None, "gamma"))
    with pytest.raises(ValueError, match="pool must be one of"):
        AttentionFamily("x", "a", "b", "c", None, "gamma", pool="avg")


class _NeverHere(Backend):
    name, priority = "never_here", -1

    def unavailable(self):
        return ["it needs hardware this machine lacks"]

    def unsupported(self, q, k, v):
        return []

    def attention(self, q, k, v, scale):  # pragma: no cover - never reached
        raise AssertionError


def test_requested_backend_that_cannot_run_raises_at_swap_time_with_the_reason():
    register_backend(_NeverHere())
    try:
        with pytest.raises(BackendUnavailableError, match="needs hardware this machine lacks"):
            swap_attention(Self_Attn(16, "relu"), backend="never_here")
    finally:
        del _REGISTRY["never_here"]


def test_swapped_layer_uses_the_requested_backend(monkeypatch):
    layer = Self_Attn(16, "relu")
    swap_attention(layer, backend="torch")
    seen = []
    real = fastattn.nn.spatial_attention
    monkeypatch.setattr(fastattn.nn, "spatial_attention",
                        lambda *a, **k: seen.append(k["backend"]) or real(*a, **k))
    layer(torch.randn(1, 16, 4, 4))
    assert seen == ["torch"]


def test_no_warning_when_everything_matches():
    gen, _ = _models()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_attention(gen)


def test_data_parallel_replicas_run_their_own_submodules():
    layer = set_residual_scalar(Self_Attn(16, "relu"))
    handle = swap_attention(layer, backend="torch")
    replica = layer._replicate_for_data_parallel()  # what nn.DataParallel does per device,
    replica.gamma = layer.gamma.detach() * 1  # then it sets the parameters as plain tensors
    assert replica.forward.module is replica and is_swapped(replica)
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(replica(x)[0], layer(x)[0])
    handle.revert()
    assert "_replicate_for_data_parallel" not in vars(layer) and "forward" not in vars(layer)


def test_fastattn_layers_in_a_model_are_switched_from_naive_and_back():
    model = nn.Sequential(fastattn.SelfAttention2d(16, attention="naive"),
                          fastattn.SelfAttention2d(16, pool=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BigGAN-like names must not read as a partial match
        handle = swap_attention(model, strict=True)
    assert [(s.name, s.family) for s in handle.swapped] == [("0", "fastattn")]
    assert [s.name for s in handle.already_swapped] == ["1"]
    assert model[0].attention == "fastattn"
    assert handle.revert() == ["0"] and model[0].attention == "naive"


def test_swapped_pooled_layer_rejects_inputs_with_no_key_left_after_pooling():
    layer = Attention(16)
    swap_attention(layer)
    with pytest.raises(ValueError, match=r"no key for an input of shape \(1, 16, 1, 6\)"):
        layer(torch.randn(1, 16, 1, 6))
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\) tensor"):
        layer(torch.randn(16, 4, 4))


def test_deepcopy_and_pickle_keep_the_swap_bound_to_the_copy():
    import io

    gen, _ = _models()
    swap_attention(gen, backend="torch")
    ema = copy.deepcopy(gen)  # BigGAN's G_ema
    buffer = io.BytesIO()
    torch.save(gen, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    z, y = _inputs()
    gen.eval(), ema.eval(), loaded.eval()
    with torch.no_grad():
        want = gen(z, y)
        for twin in (ema, loaded):
            assert twin.attn1.forward.module is twin.attn1 and is_swapped(twin.attn2)
            assert torch.equal(twin(z, y), want)


def test_r1_gradient_penalty_through_swapped_discriminator_matches_original():
    _, disc = _models()
    disc = disc.eval()  # R1 on a fixed D; BatchNorm in the partial-match block stays fixed too
    swapped = copy.deepcopy(disc)
    with pytest.warns(UserWarning):
        swap_attention(swapped, backend="torch")
    image = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    for model in (disc, swapped):
        real = image.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(real)[0].sum(), real, create_graph=True)
        grad.square().sum().backward()  # double backward through the attention
    swapped_params = dict(swapped.named_parameters())
    for name, param in disc.named_parameters():
        if param.grad is None:  # biases after the last nonlinearity do not move the input gradient
            assert swapped_params[name].grad is None, name
            continue
        assert_close(swapped_params[name].grad, param.grad, name=f"R1 grad of {name}")
    assert disc.attn1.query_conv.weight.grad.abs().sum() > 0


def test_channels_last_inputs_give_the_same_output():
    layer = set_residual_scalar(warm_up_spectral_norm(SelfAttn_like()))
    swapped = copy.deepcopy(layer)
    swap_attention(swapped, backend="torch")
    x = torch.randn(2, 16, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        got = swapped.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        assert_close(got, layer(x), name="channels_last output")


def SelfAttn_like():  # noqa: N802
    from gan_families import SelfAttn

    torch.manual_seed(0)
    return SelfAttn(16).double()


def test_softmax_child_is_optional_but_must_be_over_keys_when_present():
    class ForkForward(Self_Attn):  # forks that call torch.softmax in forward, no softmax child
        def forward(self, x):
            b, c, h, w = x.shape
            q = self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)
            attention = torch.softmax(torch.bmm(q, self.key_conv(x).view(b, -1, h * w)), dim=-1)
            out = torch.bmm(self.value_conv(x).view(b, -1, h * w), attention.permute(0, 2, 1))
            return self.gamma * out.view(b, c, h, w) + x, attention

    fork = set_residual_scalar(ForkForward(16, "relu"))
    del fork.softmax
    assert [s.family for s in swap_attention(fork).swapped] == ["heykeetae"]
    wrong_dim = Self_Attn(16, "relu")
    wrong_dim.softmax = nn.Softmax(dim=1)
    with pytest.warns(UserWarning, match=r"expected nn.Softmax\(dim=-1\)"):
        assert swap_attention(wrong_dim).swapped == []


class _CpuGather(torch.autograd.Function):
    """Stand-in for torch.nn.parallel._functions.Gather (CUDA only): concatenate on the CPU."""

    @staticmethod
    def forward(ctx, target_device, dim, *inputs):
        return torch.cat(inputs, dim)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


def _cpu_replicate(module, n):
    """torch.nn.parallel.replicate's steps without the CUDA broadcast: per-module
    _replicate_for_data_parallel, children re-linked, parameters set as non-leaf tensors."""
    modules = list(module.modules())
    copies = [{m: m._replicate_for_data_parallel() for m in modules} for _ in range(n)]
    for copy_of in copies:
        for m in modules:
            replica = copy_of[m]
            for key, child in m._modules.items():
                setattr(replica, key, copy_of[child])
            for key, param in m._parameters.items():
                setattr(replica, key, param * 1)
            for key, buf in m._buffers.items():
                setattr(replica, key, buf.clone())
    return [copy_of[module] for copy_of in copies]


def test_data_parallel_gather_of_swapped_heykeetae_replicas_gives_the_original_output_and_attention(monkeypatch):
    from torch.nn.parallel import scatter_gather

    original = set_residual_scalar(Self_Attn(16, "relu")).double()
    layer = copy.deepcopy(original)
    swap_attention(layer, backend="torch", strict=True)
    replicas = _cpu_replicate(layer, 2)  # one per device
    assert all(is_swapped(r) and r.forward.module is r for r in replicas)
    x = torch.randn(4, 16, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        outputs = [replica(chunk) for replica, chunk in zip(replicas, x.chunk(2))]
        want_out, want_attention = original(x)
    for out, attention in outputs:  # what the original layer returned: plain tensors
        assert type(attention) is torch.Tensor and attention.shape == (2, 30, 30)
    monkeypatch.setattr(scatter_gather, "Gather", _CpuGather)
    got_out, got_attention = scatter_gather.gather(outputs, "cpu")  # DataParallel's gather
    assert_close(got_out, want_out, name="gathered output")
    assert_close(got_attention, want_attention, name="gathered attention")
    with torch.no_grad():  # the swapped module itself still returns the lazy map
        assert isinstance(layer(x)[1], fastattn.AttentionMap)


def test_fastattn_mode_layer_keeps_its_backend_unless_backend_is_passed_explicitly():
    model = nn.Sequential(fastattn.SelfAttention2d(16, backend="torch"), fastattn.SelfAttention2d(16))
    handle = swap_attention(model)
    assert handle.swapped == [] and [s.name for s in handle.already_swapped] == ["0", "1"]
    assert (model[0].backend, model[1].backend) == ("torch", None)
    handle = swap_attention(model, backend=None)  # explicit: switch to automatic choice
    assert [s.name for s in handle.swapped] == ["0"] and [s.name for s in handle.already_swapped] == ["1"]
    assert model[0].backend is None
    assert handle.revert() == ["0"] and model[0].backend == "torch"
    handle = swap_attention(model, backend="torch")
    assert [s.name for s in handle.swapped] == ["1"] and model[1].backend == "torch"


@pytest.mark.parametrize("shape", [5, (2,), (1, 3), [1], ("1",), (True,)], ids=repr)
def test_attention_family_rejects_a_scalar_shape_that_is_not_one_element(shape):
    with pytest.raises(ValueError, match=rf"scalar_shape must be None or .* got {re.escape(repr(shape))}$"):
        AttentionFamily("x", "a", "b", "c", None, "gamma", shape)


@pytest.mark.parametrize("shape", [None, (), (1,), (1, 1)], ids=repr)
def test_attention_family_accepts_one_element_scalar_shapes(shape):
    assert AttentionFamily("x", "a", "b", "c", None, "gamma", shape).scalar_shape == shape
