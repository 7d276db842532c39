"""The chunked torch backend: parity with the one reference, gradients, memory bounds."""
import pytest
import torch
import torch.nn.functional as F

from allocations import LargestTensor
from fastattn import constants, spatial_attention
from fastattn.reference import reference_attention
from fastattn.shapes import gan_shapes
from fastattn.testing import assert_close, error_bound, max_abs_error

LOW = [torch.float32, torch.float16, torch.bfloat16]


def make(B, d_qk, N, M, d_v, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, d, n, generator=g, dtype=torch.float64).to(dtype)
          for d, n in ((d_qk, N), (d_qk, M), (d_v, M))]
    return [t.requires_grad_(grad) for t in ts]


def grads(fn, q, k, v, grad_out):
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v).backward(grad_out)
    return [t.grad.clone() for t in (q, k, v)]


def torch_backend(q, k, v, **kw):
    return spatial_attention(q, k, v, backend="torch", **kw)


# --- parity at the sites of real GANs ------------------------------------------------------
SITES = [pytest.param(s, id=s.id) for s in gan_shapes()]


@pytest.mark.parametrize("site", SITES)
def test_forward_matches_reference_at_gan_site_fp32(site):
    q, k, v = make(1, site.d_qk, site.N, site.M, site.d_v, torch.float32)
    if site.N * site.M > 2**28:  # 256x256 stress site: every 16th query (a strided view), all keys
        q = q[:, :, ::16]
    out, lse = torch_backend(q, k, v, return_lse=True, scale=site.scale)
    want, want_lse = reference_attention(q.double(), k.double(), v.double(), return_lse=True, scale=site.scale)
    assert_close(out, want, name=f"{site.id} out")
    assert_close(lse, want_lse, torch.float32, name=f"{site.id} lse")


@pytest.mark.parametrize("site", [s for s in SITES if s.values[0].N * s.values[0].M <= 2**22])
def test_gradients_match_reference_at_gan_site_fp32(site):
    q, k, v = make(1, site.d_qk, site.N, site.M, site.d_v, torch.float32, grad=True)
    grad_out = torch.randn(1, site.d_v, site.N)
    got = grads(torch_backend, q, k, v, grad_out)
    naive = grads(reference_attention, q, k, v, grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = grads(reference_attention, q64, k64, v64, grad_out.double())
    for name, g, n, w in zip(("dq", "dk", "dv"), got, naive, want):
        # gradients sum over thousands of queries: judge by the accuracy rule (at most 3x the
        # naive fp32 path's own error against fp64), and print both errors when it fails
        err, naive_err = max_abs_error(g, w), max_abs_error(n, w)
        bound = error_bound(naive_err, constants.ERROR_RATIO_GRAD, torch.float32)
        assert err <= bound, f"{site.id} {name}: error {err:.3g}, naive fp32 error {naive_err:.3g}"


# --- awkward shapes, dtypes and layouts ----------------------------------------------------
AWKWARD = [  # (B, d_qk, N, M, d_v)
    (2, 1, 63, 63, 40),      # d_qk = 1, odd N
    (2, 8, 63, 15, 96),      # pooled-like M != N
    (1, 10, 63, 1, 300),     # M = 1, d_v = 300
    (3, 12, 40, 7, 40),      # M smaller than any chunk
    (2, 20, 33, 64, 96),
    (1, 24, 100, 25, 300),
    (1, 64, 17, 33, 40),
]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "B{}_dqk{}_N{}_M{}_dv{}".format(*s))
def test_awkward_shapes_match_fp64_reference_within_dtype_tolerance(shape, dtype):
    q, k, v = make(*shape[:2], shape[2], shape[3], shape[4], dtype)
    q, k, v = (t * 0.5 for t in (q, k, v))
    want = reference_attention(q.double(), k.double(), v.double())
    got = torch_backend(q, k, v)
    assert got.dtype == dtype
    assert_close(got, want, dtype)
    # accuracy rule: no worse than 2x the naive path's own error in this dtype
    naive_err = max_abs_error(reference_attention(q, k, v), want)
    assert max_abs_error(got, want) <= error_bound(naive_err, constants.ERROR_RATIO_OUT, dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_gradients_within_3x_of_naive_error(dtype):
    q, k, v = make(2, 10, 63, 16, 40, dtype, grad=True)
    grad_out = torch.randn(2, 40, 63, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = grads(torch_backend, q, k, v, grad_out)
    naive = grads(reference_attention, q, k, v, grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = grads(reference_attention, q64, k64, v64, grad_out.double())
    for name, g, n, w in zip(("dq", "dk", "dv"), got, naive, want):
        assert g.dtype == dtype
        bound = error_bound(max_abs_error(n, w), constants.ERROR_RATIO_GRAD, dtype)
        assert max_abs_error(g, w) <= bound, f"{name}: {max_abs_error(g, w):.3g} > {bound:.3g}"


# --- fp32 at large unscaled logits ----------------------------------------------------------
# Unscaled GAN logits reach |s| ~ 1e4; there the softmax is nearly one-hot and the naive path's
# largest probability is exactly 1 (benchmarks/large_logit_accuracy.py sweeps this).
LARGE_LOGIT_SHAPES = [(2, 10, 63, 40, 96), (2, 8, 64, 64, 16)]  # (B, d_qk, N, M, d_v)


def _scaled_to_logit_magnitude(shape, magnitude, seed):
    """q, k, v, grad_out, grad_lse in fp32, with q and k scaled so that max |q.k| = magnitude."""
    batch, d_qk, n, m, d_v = shape
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(batch, d_qk, n, generator=gen), torch.randn(batch, d_qk, m, generator=gen)
    factor = (magnitude / float(torch.bmm(q.transpose(1, 2), k).abs().max())) ** 0.5
    v = torch.randn(batch, d_v, m, generator=gen)
    return q * factor, k * factor, v, torch.randn(batch, d_v, n, generator=gen), torch.randn(batch, n, generator=gen)


def _out_lse_grads(fn, q, k, v, grad_out, grad_lse):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("magnitude", [40, 400, 2.5e3, 1.1e4, 3e4])
@pytest.mark.parametrize("shape", LARGE_LOGIT_SHAPES, ids=lambda s: "B{}_dqk{}_N{}_M{}_dv{}".format(*s))
def test_fp32_out_lse_and_gradients_within_accuracy_rule_at_large_unscaled_logits(shape, magnitude):
    q, k, v, grad_out, grad_lse = _scaled_to_logit_magnitude(shape, magnitude, seed=0)
    naive_fn = lambda *t: reference_attention(*t, return_lse=True)  # noqa: E731
    want = _out_lse_grads(naive_fn, q.double(), k.double(), v.double(), grad_out.double(), grad_lse.double())
    naive = _out_lse_grads(naive_fn, q, k, v, grad_out, grad_lse)
    got = _out_lse_grads(lambda *t: torch_backend(*t, return_lse=True), q, k, v, grad_out, grad_lse)
    ratios = [constants.ERROR_RATIO_OUT] * 2 + [constants.ERROR_RATIO_GRAD] * 3
    for name, g, n, w, ratio in zip(("out", "lse", "dq", "dk", "dv"), got, naive, want, ratios):
        bound = error_bound(max_abs_error(n, w), ratio, torch.float32)
        assert max_abs_error(g, w) <= bound, (
            f"{name}: error {max_abs_error(g, w):.3g} > {bound:.3g} ({ratio}x naive {max_abs_error(n, w):.3g} + floor)")


def test_strided_inputs_give_the_same_result_as_contiguous_ones():
    """Views straight from a 1x1 conv, a max-pool, and transposed token-major tensors."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    theta = torch.nn.Conv2d(16, 2, 1, bias=False).double()
    phi = torch.nn.Conv2d(16, 2, 1, bias=False).double()
    g = torch.nn.Conv2d(16, 8, 1, bias=False).double()
    q = theta(x).flatten(2)
    k = F.max_pool2d(phi(x), 2).flatten(2)
    v = F.max_pool2d(g(x), 2).flatten(2)[:, ::2]  # every other channel: non-unit channel stride
    tokens = torch.randn(2, 63, 2, dtype=torch.float64)
    for qq in (q, tokens.transpose(1, 2)):
        want = reference_attention(qq.contiguous(), k.contiguous(), v.contiguous())
        assert_close(torch_backend(qq, k, v), want)


def test_fp16_unscaled_large_logits_stay_finite_where_naive_overflows():
    torch.manual_seed(0)
    # |q . k| around 1e4 and beyond: fp16 logits overflow (max 65504) in the naive bmm
    q = torch.randn(1, 8, 64, dtype=torch.float64) * 120
    k = torch.randn(1, 8, 32, dtype=torch.float64) * 120
    v = torch.randn(1, 16, 32, dtype=torch.float64)
    want = reference_attention(q, k, v)
    naive = reference_attention(q.half(), k.half(), v.half())
    assert not naive.isfinite().all(), "the naive fp16 path was expected to overflow here"
    got = torch_backend(q.half(), k.half(), v.half())
    assert got.isfinite().all()
    # fp16 rounding of q and k moves logits of size 1e4 by ~1e1, so compare with the fp64
    # reference of the fp16-rounded inputs (what the kernel was actually given)
    want_rounded = reference_attention(q.half().double(), k.half().double(), v.half().double())
    assert_close(got, want_rounded, torch.float16)
    logits = (q.transpose(1, 2) @ k).abs()
    assert logits.median() > 5e3 and logits.max() > 65504  # the regime this test is about


# --- gradients in fp64 ---------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_gradcheck_fp64_including_lse_output(scale, monkeypatch):
    monkeypatch.setattr(constants, "TORCH_CHUNK_BYTES", 5 * 7 * 8 * 2)  # several chunks
    q, k, v = make(2, 3, 9, 7, 5, grad=True)
    fn = lambda a, b, c: spatial_attention(a, b, c, scale=scale, backend="torch", return_lse=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_double_backward_gradgradcheck_fp64(monkeypatch):
    monkeypatch.setattr(constants, "TORCH_CHUNK_BYTES", 5 * 7 * 8 * 2)
    q, k, v = make(1, 3, 9, 7, 5, grad=True)
    fn = lambda a, b, c: spatial_attention(a, b, c, scale=0.8, backend="torch", return_lse=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_r1_penalty_through_attention_matches_naive():
    """Gradient penalties (R1/WGAN-GP) need double backward through the layer."""
    q, k, v = make(1, 4, 12, 6, 5, grad=True)
    def penalty(fn):
        out = fn(q, k, v)
        (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return torch.autograd.grad(g.square().sum(), (q, k, v))
    for a, b in zip(penalty(torch_backend), penalty(reference_attention)):
        torch.testing.assert_close(a, b)


# --- memory --------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [512, 2048])
def test_no_intermediate_grows_with_n_times_m(N, monkeypatch):
    budget = 64 * 1024
    monkeypatch.setattr(constants, "TORCH_CHUNK_BYTES", budget)
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_BYTES", 0)  # the chunked strategy
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_SMALL_SAMPLE_BYTES", 0)
    M, d_v = N, 16
    q, k, v = make(1, 8, N, M, d_v, torch.float32, grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with LargestTensor() as mode:
            out = torch_backend(q, k, v)
            out.backward(torch.ones_like(out))
    io_largest = max(t.numel() for t in (q, k, v, out))
    assert mode.largest_numel <= max(io_largest, budget // 4), (mode.largest_numel, N * M)
    assert max(saved) <= io_largest  # nothing of size N x M saved for backward


def test_chunk_rows_do_not_change_results(monkeypatch):
    q, k, v = make(2, 8, 70, 30, 12, grad=False)
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_BYTES", 0)  # the chunked strategy
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_SMALL_SAMPLE_BYTES", 0)
    want = torch_backend(q, k, v)
    for budget in (8, 30 * 8 * 2 * 3, 10**9):  # 1 row, uneven chunks, one chunk
        monkeypatch.setattr(constants, "TORCH_CHUNK_BYTES", budget)
        torch.testing.assert_close(torch_backend(q, k, v), want, rtol=1e-12, atol=1e-12)


def test_autocast_does_not_lower_the_internal_fp32_precision():
    """Under bf16 autocast the fp32 call still computes in fp32: against an fp64 reference it is
    within fp32 tolerance (bf16 matmuls would miss by ~1e-2)."""
    q, k, v = make(2, 8, 40, 20, 12, torch.float32, grad=True)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference_attention(*exact)
    want_grads = torch.autograd.grad(want.sum(), exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch_backend(q, k, v)
        got_grads = torch.autograd.grad(got.sum(), (q, k, v))
    assert got.dtype == torch.float32
    tol = constants.TOLERANCES[torch.float32]
    torch.testing.assert_close(got.double(), want, **tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, **tol)
