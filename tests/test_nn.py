"""fastattn.nn.SelfAttention2d: the drop-in layer, fused vs naive on the same parameters."""
import copy

import pytest
import torch

import fastattn
import fastattn.nn as fnn
from fastattn.nn import SelfAttention2d
from fastattn.testing import assert_close

CONFIGS = {
    "unpooled_sagan": dict(pool=False, out_conv=False, bias=True),
    "pooled_biggan_sn": dict(pool=True, spectral_norm=True),
    "pooled_bias": dict(pool=True, bias=True),
    "unpooled_out_conv_custom_widths": dict(pool=False, qk_channels=3, v_channels=5),
}


def _pair(config, channels=16, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    fused = SelfAttention2d(channels, backend="torch", **config).to(dtype)
    with torch.no_grad():
        fused.gamma.fill_(0.7)
    naive = SelfAttention2d(channels, attention="naive", **config).to(dtype)
    naive.load_state_dict(fused.state_dict())
    return fused, naive


def test_default_widths_follow_the_two_families():
    unpooled, pooled = SelfAttention2d(64), SelfAttention2d(64, pool=True)
    assert (unpooled.theta.out_channels, unpooled.phi.out_channels, unpooled.g.out_channels) == (8, 8, 64)
    assert (pooled.theta.out_channels, pooled.g.out_channels, pooled.o.in_channels) == (8, 32, 32)
    assert pooled.o.out_channels == 64
    assert SelfAttention2d(64, out_conv=False).o is None


def test_gamma_starts_at_zero_so_the_layer_starts_as_identity():
    layer = SelfAttention2d(16, pool=True)
    assert layer.gamma.shape == () and float(layer.gamma.detach()) == 0.0
    x = torch.randn(2, 16, 6, 6)
    assert torch.equal(layer(x), x)


def test_package_exports_the_layer():
    assert fastattn.SelfAttention2d is SelfAttention2d


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("hw", [(6, 8), (7, 5)], ids=["even", "odd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_fused_matches_naive_outputs_and_all_gradients(name, hw, dtype):
    fused, naive = _pair(CONFIGS[name], dtype=dtype)
    x = torch.randn(2, 16, *hw, dtype=dtype)
    x_fused, x_naive = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fused, out_naive = fused(x_fused), naive(x_naive)
    assert_close(out_fused, out_naive, name=f"{name} output")
    grad = torch.randn_like(out_fused)
    out_fused.backward(grad)
    out_naive.backward(grad)
    assert_close(x_fused.grad, x_naive.grad, name="grad of x")
    params_naive = dict(naive.named_parameters())
    for pname, param in fused.named_parameters():
        assert_close(param.grad, params_naive[pname].grad, name=f"grad of {pname}")


def test_state_dict_keys_are_identical_between_fused_and_naive_modes():
    fused, naive = _pair(CONFIGS["pooled_biggan_sn"])
    assert list(fused.state_dict()) == list(naive.state_dict())
    assert "gamma" in fused.state_dict() and any(k.startswith("o.") for k in fused.state_dict())


def test_spectral_norm_state_updates_identically_in_training():
    fused, naive = _pair(CONFIGS["pooled_biggan_sn"])
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    for layer in (fused, naive):
        layer.train()
        layer(x).square().mean().backward()
    naive_state = naive.state_dict()
    before = _pair(CONFIGS["pooled_biggan_sn"])[0].state_dict()
    changed = [k for k, v in fused.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("_u") for k in changed), "spectral norm power iteration did not run"
    for key, value in fused.state_dict().items():
        assert_close(value, naive_state[key], name=key)


def test_pooled_odd_sizes_floor_the_key_grid():
    layer = SelfAttention2d(16, pool=True, backend="torch")
    amap = layer.attention_map(torch.randn(1, 16, 7, 5))
    assert amap.shape == (1, 35, 3 * 2) and amap.key_hw == (3, 2)


def test_attention_receives_views_of_the_conv_outputs_not_copies(monkeypatch):
    layer = SelfAttention2d(16, pool=False, backend="torch")
    conv_out, seen = {}, {}
    for name in ("theta", "phi", "g"):
        getattr(layer, name).register_forward_hook(
            lambda mod, args, out, name=name: conv_out.__setitem__(name, out))
    real = fnn.spatial_attention

    def spy(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fnn, "spatial_attention", spy)
    layer(torch.randn(2, 16, 5, 6))
    for arg, name in (("q", "theta"), ("k", "phi"), ("v", "g")):
        assert seen[arg].data_ptr() == conv_out[name].data_ptr(), f"{arg} is a copy"
        assert seen[arg]._base is conv_out[name], f"{arg} is not a view of {name}'s output"


def test_fused_layer_under_cpu_bf16_autocast_stays_close_to_fp32():
    fused, _ = _pair(CONFIGS["pooled_biggan_sn"], dtype=torch.float32)
    fused.eval()
    x = torch.randn(2, 16, 8, 8)
    want = fused(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(x)
    assert got.dtype in (torch.bfloat16, torch.float32)
    assert_close(got.float(), want, dtype=torch.bfloat16, name="bf16 autocast output")


def test_attention_core_switches_autocast_off_only_when_it_is_on(monkeypatch):
    # entering torch.autocast costs microseconds per call: skipped when autocast is off, and
    # under autocast the backend still runs with it off (its fp32 accumulation must not be lowered)
    seen = []

    def spy(q, k, v, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return fastattn.reference_attention(q, k, v)

    monkeypatch.setattr(fnn, "spatial_attention", spy)
    q, k, v = torch.randn(1, 4, 6), torch.randn(1, 4, 3), torch.randn(1, 5, 3)
    real_autocast = torch.autocast
    with real_autocast("cpu", dtype=torch.bfloat16):
        fnn.attention_core(q, k, v)
    monkeypatch.setattr(torch, "autocast", lambda *a, **kw: pytest.fail("entered torch.autocast while it was off"))
    out = fnn.attention_core(q, k, v)
    assert seen == [False, False]
    assert torch.equal(out, fastattn.reference_attention(q, k, v))


def test_deepcopy_keeps_parameters_and_output():
    fused, _ = _pair(CONFIGS["pooled_bias"])
    twin = copy.deepcopy(fused)
    x = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    assert torch.equal(twin(x), fused(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=16, out_conv=False, pool=True), "v_channels must equal in_channels=16"),
        (dict(in_channels=16, attention="flash"), "attention must be one of"),
        (dict(in_channels=16, qk_channels=0), "qk_channels must be >= 1"),
        (dict(in_channels=16, attention="naive", backend="torch"), "only applies to attention='fastattn'"),
        (dict(in_channels=None), "^in_channels must be a positive int, got None$"),
        (dict(in_channels=0), "^in_channels must be >= 1, got 0$"),
        (dict(in_channels=16, spectral_norm=True, sn_eps=0), r"sn_eps .* must be a finite number > 0, got 0$"),
        (dict(in_channels=16, spectral_norm=True, sn_eps=-1e-6), r"sn_eps .* must be a finite number > 0, got -1e-06$"),
        (dict(in_channels=16, spectral_norm=True, sn_eps=float("nan")), r"sn_eps .* > 0, got nan$"),
        (dict(in_channels=16, spectral_norm=True, sn_eps="1e-6"), "sn_eps must be a positive float, got str '1e-6'"),
        (dict(in_channels=16, backend="nope"), r"^backend must be one of \[.*'torch'.*\] or None \(automatic\), got 'nope'$"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SelfAttention2d(**kwargs)


def test_bad_inputs_name_the_expected_shape():
    layer = SelfAttention2d(16, pool=True)
    with pytest.raises(ValueError, match=r"x must have shape \(B, in_channels=16, H, W\), got \(2, 8, 4, 4\)"):
        layer(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="H >= 2 and W >= 2"):
        layer(torch.randn(2, 16, 1, 4))


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(2, 16, 4, 4, dtype=torch.float64), TypeError,
     r"x has dtype torch.float64 but the layer's weights are torch.float32: pass x as torch.float32"),
    (torch.zeros(2, 16, 4, 4, dtype=torch.int64), TypeError,
     r"x must be a floating-point tensor like the layer's weights \(torch.float32\), got torch.int64"),
    (torch.randn(2, 16, 0, 4), ValueError, r"x must have H >= 1 and W >= 1 .* got shape \(2, 16, 0, 4\)"),
    (torch.randn(2, 16, 4, 0), ValueError, r"got shape \(2, 16, 4, 0\)"),
    (torch.empty(2, 16, 4, 4, device="meta"), ValueError, r"x is on meta but the layer's weights are on cpu"),
])
def test_wrong_dtype_empty_or_misplaced_input_names_what_was_received_and_expected(x, error, match):
    layer = SelfAttention2d(16, spectral_norm=True)
    with pytest.raises(error, match=match):
        layer(x)


def test_an_empty_batch_and_autocast_inputs_still_run():
    layer = SelfAttention2d(16)
    assert layer(torch.randn(0, 16, 4, 4)).shape == (0, 16, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(1, 16, 4, 4)).shape == (1, 16, 4, 4)


@pytest.mark.parametrize("pool", [False, True])
def test_a_meta_layer_infers_the_output_shape_without_data(pool):
    with torch.device("meta"):
        layer = SelfAttention2d(16, pool=pool, spectral_norm=True, backend="torch")
        out = layer(torch.empty(2, 16, 6, 5))
    assert out.device.type == "meta" and out.shape == (2, 16, 6, 5) and out.dtype == torch.float32


def test_positive_sn_eps_reaches_the_spectral_norm():
    layer = SelfAttention2d(16, spectral_norm=True, sn_eps=1e-4)
    assert layer.theta.parametrizations.weight[0].eps == 1e-4
