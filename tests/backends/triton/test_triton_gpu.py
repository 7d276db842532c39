"""The Triton kernels on a CUDA device, at the real attention-GAN sizes (small batch).

On a GPU machine the plain test command runs them (tests/conftest.py leaves TRITON_INTERPRET
unset when CUDA is available); just this file: python -m pytest -q -m gpu tests/backends/triton/test_triton_gpu.py.
They skip without CUDA, and the whole file skips when the kernels were built by the interpreter.

Most tests pin the fixed configuration (FASTATTN_TRITON_CONFIG=fixed) so that the file compiles
a handful of kernels instead of autotuning every site; test_autotuned_* covers the autotuner.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn import spatial_attention
from fastattn.constants import ERROR_RATIO_GRAD, ERROR_RATIO_OUT
from fastattn.reference import reference_attention
from fastattn.shapes import gan_shape, gan_shapes
from fastattn.testing import assert_close, describe_mismatch, error_bound, max_abs_error

triton = pytest.importorskip("triton")
from fastattn.kernels.autotune import CONFIG_ENV_VAR, interpreting, tuned_configs  # noqa: E402

if interpreting():
    pytest.skip("the kernels were built by Triton's interpreter: unset TRITON_INTERPRET "
                "(tests/conftest.py sets it only without CUDA, or FASTATTN_GPU_TESTS=1)", allow_module_level=True)

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
BATCH = 2
# The fp64 reference materialises (B, N, M) in fp64: leave out the two stress sites (N x M up
# to 2^30), which the memory test below covers instead.
ACCURACY_SITES = [s.id for s in gan_shapes() if s.N * s.M <= 2**26]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture
def fixed_config(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV_VAR, "fixed")


@pytest.fixture
def ieee_fp32():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _inputs(site, batch, dtype, seed=0):
    s = gan_shape(site)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, s.d_qk, s.N, device=DEVICE, generator=gen).to(dtype)
    k = torch.randn(batch, s.d_qk, s.M, device=DEVICE, generator=gen).to(dtype)
    v = torch.randn(batch, s.d_v, s.M, device=DEVICE, generator=gen).to(dtype)
    grad_out = torch.randn(batch, s.d_v, s.N, device=DEVICE, generator=gen)
    grad_lse = torch.randn(batch, s.N, device=DEVICE, generator=gen)
    return q, k, v, grad_out, grad_lse


def _run(q, k, v, backend, grad_out, grad_lse):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if backend is None:
        out, lse = reference_attention(*leaves, return_lse=True)
    else:
        out, lse = spatial_attention(*leaves, backend=backend, return_lse=True)
    torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def _check_accuracy_rule(q, k, v, grad_out, grad_lse, dtype):
    want = _run(q.double(), k.double(), v.double(), None, grad_out.double(), grad_lse.double())
    naive = _run(q, k, v, None, grad_out, grad_lse)
    got = _run(q, k, v, "triton", grad_out, grad_lse)
    ratios = [ERROR_RATIO_OUT] * 2 + [ERROR_RATIO_GRAD] * 3
    for name, g, nv, w, ratio in zip(["out", "lse", "dq", "dk", "dv"], got, naive, want, ratios):
        assert g.isfinite().all(), f"{name} has non-finite values"
        bound = error_bound(max_abs_error(nv, w), ratio, dtype)
        err = max_abs_error(g, w)
        assert err <= bound, (f"{name}: error {err:.3g} against fp64 exceeds {ratio}x the naive error "
                              f"{max_abs_error(nv, w):.3g} + floor; {describe_mismatch(g, w, 0.0, 0.0, name)}")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("site", ACCURACY_SITES)
def test_gan_site_out_lse_and_gradients_within_accuracy_rule(site, dtype_name, fixed_config, ieee_fp32):
    dtype = DTYPES[dtype_name]
    _check_accuracy_rule(*_inputs(site, BATCH, dtype), dtype)


def test_tf32_fp32_stays_within_accuracy_rule_of_naive_tf32(fixed_config):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _check_accuracy_rule(*_inputs("biggan128_G", BATCH, torch.float32), torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)


def test_autotuned_configuration_is_accurate_and_cached_per_shape():
    q, k, v, grad_out, grad_lse = _inputs("biggan128_D", 4, torch.bfloat16)
    _check_accuracy_rule(q, k, v, grad_out, grad_lse, torch.bfloat16)
    kinds = {key[0] for key in tuned_configs() if key[1:5] == (q.shape[2], k.shape[2], q.shape[1], v.shape[1])}
    assert kinds == {"forward", "backward"}


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_large_logits_stay_finite_and_correct_where_naive_overflows(dtype_name, fixed_config):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q = (torch.randn(2, 24, 1024, device=DEVICE, generator=gen) * 60).to(dtype)
    k = (torch.randn(2, 24, 256, device=DEVICE, generator=gen) * 60).to(dtype)
    v = torch.randn(2, 96, 256, device=DEVICE, generator=gen).to(dtype)
    out, lse = spatial_attention(q, k, v, backend="triton", return_lse=True)
    want, want_lse = reference_attention(q.double(), k.double(), v.double(), return_lse=True)
    if dtype == torch.float16:
        assert not reference_attention(q, k, v).isfinite().all(), "the naive fp16 path should overflow here"
    assert out.isfinite().all() and lse.isfinite().all()
    assert_close(out, want, dtype, "out")
    assert_close(lse, want_lse, torch.float32, "lse", rtol=1e-6)


def test_fixed_configuration_is_bitwise_deterministic(fixed_config):
    q, k, v, grad_out, grad_lse = _inputs("biggan128_G", BATCH, torch.bfloat16)
    first = _run(q, k, v, "triton", grad_out, grad_lse)
    second = _run(q, k, v, "triton", grad_out, grad_lse)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], first, second):
        assert torch.equal(a, b), f"{name} differs between two runs of the fixed configuration"


@pytest.mark.parametrize("site", ["stress_unpooled128", "stress_pooled256"])
def test_memory_beyond_inputs_and_outputs_stays_far_below_one_n_by_m_matrix(site, fixed_config):
    s = gan_shape(site)
    q, k, v, grad_out, _ = _inputs(site, 1, torch.float16)
    _run(q[..., :256], k[..., :64], v[..., :64], "triton", grad_out[..., :256], torch.zeros(1, 256, device=DEVICE))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad_out = grad_out.half()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = spatial_attention(*leaves, backend="triton")
    out.backward(grad_out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # out, lse, delta, dq/dk/dv and their fp32 staging: a few times the inputs' size
    io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, out))
    n_by_m_bytes = s.N * s.M * 2
    assert extra <= 4 * io_bytes + 2**20, f"{extra / 2**20:.1f} MiB beyond the inputs, io {io_bytes / 2**20:.1f} MiB"
    assert extra < n_by_m_bytes / 16


class _PooledAttention(nn.Module):
    """A BigGAN/StudioGAN-style pooled attention layer calling the Triton backend."""

    def __init__(self, channels):
        super().__init__()
        self.theta = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.phi = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.g = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.o = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        batch, _, height, width = x.shape
        q = self.theta(x).flatten(2)
        k = F.max_pool2d(self.phi(x), 2).flatten(2)
        v = F.max_pool2d(self.g(x), 2).flatten(2)
        out = spatial_attention(q, k, v, backend="triton")
        return x + self.gamma * self.o(out.view(batch, -1, height, width))


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_layer_compiles_with_fullgraph_and_matches_eager(dtype_name, fixed_config):
    dtype = DTYPES[dtype_name]
    fastattn.available_backends()  # dispatch loads backends with importlib, which dynamo cannot trace
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = _PooledAttention(192).to(DEVICE, dtype)
    x = torch.randn(2, 192, 32, 32, device=DEVICE, dtype=dtype)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    y_eager = layer(x)
    y_eager.float().square().mean().backward()
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, y_eager, **tol)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16", "fp32"])
def test_ops_pass_opcheck_on_cuda(dtype_name, fixed_config):
    from fastattn.backends.triton.ops import USES_TRITON_OP, attention_backward_op, attention_forward_op

    assert USES_TRITON_OP == hasattr(torch.library, "triton_op")
    dtype = DTYPES[dtype_name]
    q, k, v, grad_out, grad_lse = _inputs("cifar_G", 1, dtype)
    torch.library.opcheck(attention_forward_op, (q, k, v, 1.0, "ieee"))
    out, lse, stats = attention_forward_op(q, k, v, 1.0, "ieee")
    torch.library.opcheck(attention_backward_op, (grad_out.to(dtype), grad_lse, q, k, v, out, stats, 1.0, "ieee"))


def test_automatic_choice_picks_triton_on_cuda():
    q, k, v, *_ = _inputs("cifar_G", 1, torch.float16)
    assert fastattn.dispatch.select_backend(q, k, v).name == "triton"


# Ragged shapes (every gan_shapes site has N and M divisible by 64, so the sites above never
# compile a partial tile), run through EVERY candidate configuration of the tables, atomic dQ
# included, and a query whose logits are all very negative (lse ~ -400: padded keys must get
# p = 0 in the atomic dQ). Review found that last case returning NaN dQ in the interpreter.
RAGGED = [(2, 10, 63, 40, 300), (1, 3, 100, 9, 5), (2, 24, 130, 1, 96), (1, 20, 77, 257, 40)]


def _every_config_matches_fp64(batch, d_qk, n, m, d_v, dtype, very_negative=False):
    from fastattn.kernels.backward import launch_backward
    from fastattn.kernels.configs import backward_candidates, forward_candidates, pad_width, tables
    from fastattn.kernels.forward import launch_forward

    gen = torch.Generator(device=DEVICE).manual_seed(7)
    q = torch.randn(batch, d_qk, n, device=DEVICE, generator=gen)
    k = torch.randn(batch, d_qk, m, device=DEVICE, generator=gen)
    v = torch.randn(batch, d_v, m, device=DEVICE, generator=gen)
    if very_negative:
        q, k = -q.abs() * 6 - 3, k.abs() * 6 + 3
    q, k, v = (t.to(dtype) for t in (q, k, v))
    grad_out = torch.randn(batch, d_v, n, device=DEVICE, generator=gen).to(dtype)
    grad_lse = torch.randn(batch, n, device=DEVICE, generator=gen)
    want = _run(q.double(), k.double(), v.double(), None, grad_out.double(), grad_lse.double())
    naive = _run(q, k, v, None, grad_out, grad_lse)
    bounds = [error_bound(max_abs_error(nv, w), r, dtype)
              for nv, w, r in zip(naive, want, [ERROR_RATIO_OUT] * 2 + [ERROR_RATIO_GRAD] * 3)]
    precision = "ieee"
    d_pad, dv_pad = pad_width(d_qk), pad_width(d_v)
    fwd_table, bwd_table, _, _ = tables(q.element_size())
    shared = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    for f_config in forward_candidates(fwd_table, n, m, d_qk, d_v, q.element_size(), shared_bytes=shared):
        out = torch.empty(batch, d_v, n, device=DEVICE, dtype=dtype)
        lse = torch.empty(batch, n, device=DEVICE, dtype=torch.float32)
        stats = torch.empty(batch, 2, n, device=DEVICE, dtype=torch.float32)
        launch_forward(lambda f: f, q, k, v, out, lse, stats, 1.0, precision, f_config, d_pad)
        for name, g, w, bound in (("out", out, want[0], bounds[0]), ("lse", lse, want[1], bounds[1])):
            assert g.isfinite().all() and max_abs_error(g, w) <= bound, f"{f_config} {name}"
        for b_config in backward_candidates(bwd_table, n, m, d_qk, d_v, q.element_size(), shared_bytes=shared):
            grads = launch_backward(lambda f: f, grad_out, grad_lse, q, k, v, out, stats, 1.0, precision,
                                    b_config, d_pad, dv_pad)
            for name, g, w, bound in zip(("dq", "dk", "dv"), grads, want[2:], bounds[2:]):
                assert g.isfinite().all(), f"{b_config} {name} has non-finite values"
                assert max_abs_error(g, w) <= bound, f"{b_config} {name}: {max_abs_error(g, w):.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", RAGGED, ids=lambda s: "B{}_dqk{}_N{}_M{}_dv{}".format(*s))
def test_every_configuration_handles_ragged_tiles_within_accuracy_rule(shape, dtype_name, ieee_fp32):
    _every_config_matches_fp64(*shape, DTYPES[dtype_name])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_every_configuration_keeps_dq_finite_and_within_accuracy_rule_when_all_logits_are_very_negative(
        dtype_name, ieee_fp32):
    _every_config_matches_fp64(2, 10, 33, 20, 40, DTYPES[dtype_name], very_negative=True)


def test_kernels_run_on_the_inputs_device_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    q, k, v = (torch.randn(1, 8, n, device="cuda:1") for n in (64, 32, 32))
    with torch.cuda.device(0):
        out = spatial_attention(q, k, v, backend="triton")
    assert out.device == q.device
    assert_close(out, reference_attention(q.double(), k.double(), v.double()), torch.float32)
