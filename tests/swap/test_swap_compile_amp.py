"""Swapped models under torch.compile and autocast (CPU here; the CUDA variants are marked gpu).

CPU compile uses the aot_eager backend: it runs Dynamo and AOTAutograd (graph capture of the
swapped forward and its backward, which is where a swap can break) without Inductor's C++
build, which takes ~40 s per graph on the 2-core CI machine.
"""
import copy

import pytest
import torch

import fastattn
from fastattn.constants import ERROR_RATIO_OUT
from fastattn.testing import assert_close, error_bound, max_abs_error
from gan_families import (Attention, Self_Attn, SmallDiscriminator, SmallGenerator,
                          residual_scalars_nonzero, set_residual_scalar)


def _generator(dtype=torch.float32):
    torch.manual_seed(0)
    return residual_scalars_nonzero(SmallGenerator().to(dtype))


def _zy(batch=4, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 8, generator=g, dtype=dtype).to(device),
            torch.tensor([0, 1, 2, 1][:batch] * (batch // 4 or 1), device=device)[:batch])


def test_compiled_swapped_generator_matches_eager_outputs_gradients_and_sn_state():
    eager = _generator(torch.float64)
    fastattn.swap_attention(eager, backend="torch", strict=True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    z, y = _zy(dtype=torch.float64)
    for step in range(2):  # the second call reuses the graph; SN state has moved on
        out_eager, out_compiled = eager(z, y), compiled(z, y)
        assert_close(out_compiled, out_eager, name=f"compiled output, call {step}")
        out_eager.square().mean().backward()
        out_compiled.square().mean().backward()
    params = dict(compiled_model.named_parameters())
    for name, param in eager.named_parameters():
        assert_close(params[name].grad, param.grad, name=f"grad of {name}")
    state = compiled_model.state_dict()
    for key, value in eager.state_dict().items():
        assert_close(state[key], value, name=f"state {key}")


@pytest.mark.parametrize("build", [lambda: Attention(16), lambda: Self_Attn(16, "relu")],
                         ids=["biggan", "heykeetae_returning_the_map"])
def test_swapped_layer_compiles_without_graph_breaks(build):
    import torch._dynamo

    layer = set_residual_scalar(build())
    fastattn.swap_attention(layer, backend="torch")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 16, 8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("model_name", ["generator", "discriminator"])
def test_bf16_autocast_swapped_error_is_within_the_accuracy_rule_of_the_original(model_name):
    torch.manual_seed(0)
    if model_name == "generator":
        original = warm_up_spectral_norm_model(_generator())
        args = _zy()
    else:
        original = residual_scalars_nonzero(SmallDiscriminator(norm_block=False))
        args = (torch.rand(4, 3, 16, 16) * 2 - 1,)
    original.eval()
    swapped = copy.deepcopy(original)
    fastattn.swap_attention(swapped, backend="torch", strict=True)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    with torch.no_grad():
        want = first(original(*args))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            naive, got = first(original(*args)), first(swapped(*args))
    assert torch.isfinite(got).all()
    naive_error = max_abs_error(naive, want)
    assert max_abs_error(got, want) <= error_bound(naive_error, ERROR_RATIO_OUT, torch.bfloat16), (
        f"swapped bf16 error {max_abs_error(got, want):.3g} vs naive bf16 error {naive_error:.3g}")


def warm_up_spectral_norm_model(model):
    """Power-iterate every SN of a model with its own inputs (the generator takes z, y)."""
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(*_zy())
    return model


def test_fp16_autocast_swapped_layer_stays_finite_where_the_naive_bmm_overflows():
    layer = set_residual_scalar(Self_Attn(16, "relu"))
    with torch.no_grad():  # logits of a few 1e5, past fp16's 65504
        layer.query_conv.weight.mul_(300)
        layer.key_conv.weight.mul_(300)
    swapped = copy.deepcopy(layer)
    fastattn.swap_attention(swapped, backend="torch", strict=True)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want, _ = layer(x)
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                naive, _ = layer(x)
                got, amap = swapped(x)
        except RuntimeError as error:  # older torch: no fp16 autocast on CPU
            pytest.skip(f"CPU fp16 autocast unavailable: {error}")
    assert not torch.isfinite(naive).all(), "the naive layer was expected to overflow here"
    assert torch.isfinite(got).all() and torch.isfinite(amap[0, 3]).all()
    assert_close(got, want, dtype=torch.float16, name="fp16 autocast output")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast_swapped_generator_matches_fp32(dtype):
    original = _generator().cuda().eval()
    swapped = copy.deepcopy(original)
    fastattn.swap_attention(swapped, strict=True)
    z, y = _zy(device="cuda")
    with torch.no_grad():
        want = original(z, y)
        with torch.autocast("cuda", dtype=dtype):
            naive, got = original(z, y), swapped(z, y)
    assert max_abs_error(got, want) <= error_bound(max_abs_error(naive, want), ERROR_RATIO_OUT, dtype)


@pytest.mark.gpu
def test_cuda_compiled_swapped_generator_matches_eager():
    eager = _generator().cuda()
    fastattn.swap_attention(eager, strict=True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    z, y = _zy(device="cuda")
    assert_close(compiled(z, y), eager(z, y), name="compiled (inductor) output")


@pytest.mark.parametrize("name", ["groupnorm_attnblock", "multihead_qkv_einsum_h32", "sdpa_heads"])
def test_layer_captured_by_computation_compiles_fullgraph_and_matches_eager(name):
    from swap_corpus import CORPUS

    build, (c, h, w), _ = CORPUS[name]
    layer = build()
    assert [s.family for s in fastattn.swap_attention(layer, backend="torch").swapped] == ["traced"]
    x = torch.randn(2, c, h, w)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert_close(compiled(x), layer(x), name=f"{name} compiled output")
