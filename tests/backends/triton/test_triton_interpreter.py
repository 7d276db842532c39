"""The Triton kernels on CPU under TRITON_INTERPRET=1 (set by conftest.py), against fp64.

Accuracy rule (fastattn.constants): the kernel's error against an fp64 reference is at most
ERROR_RATIO_OUT (out, lse) / ERROR_RATIO_GRAD (gradients) times the naive PyTorch path's error
in the same dtype, plus ERROR_FLOOR. Shapes are small (every program runs in numpy) but cover
d_qk in {3, 8, 10, 24}, d_v in {5, 40, 96, 300}, odd N, M != N, M = 1, M below the 16-key tile,
and the strided views attention layers produce. bf16 is GPU-only: the interpreter cannot run
bf16 tl.dot (tests/backends/triton/test_triton_gpu.py covers it).
"""
import dataclasses
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastattn import spatial_attention
from fastattn.constants import ERROR_RATIO_GRAD, ERROR_RATIO_OUT
from fastattn.reference import reference_attention
from fastattn.testing import assert_close, describe_mismatch, error_bound, max_abs_error

triton = pytest.importorskip("triton")
from fastattn.kernels.autotune import interpreting  # noqa: E402

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 before triton is imported"),
]

SCALE = 0.75


def _contiguous(batch, d_qk, n, m, d_v, dtype, gen):
    q = torch.randn(batch, d_qk, n, generator=gen)
    k = torch.randn(batch, d_qk, m, generator=gen)
    v = torch.randn(batch, d_v, m, generator=gen)
    return [t.to(dtype) for t in (q, k, v)]


def _conv_views(batch, d_qk, n, m, d_v, dtype, gen):
    """q and k as channel slices of one fused 1x1-conv output (batch stride != d*N), k and v
    max-pooled 2x2 from odd-sized maps (floor), v from a channels_last map (token-major)."""
    side = int(round(n ** 0.5))
    assert side * side == n and (side // 2) ** 2 == m
    x = torch.randn(batch, 2 * d_qk + 1, side, side, generator=gen).to(dtype)
    q = x[:, :d_qk].flatten(2)
    k = F.max_pool2d(x[:, d_qk:2 * d_qk].float(), 2).to(dtype).flatten(2)
    xv = torch.randn(batch, d_v, side, side, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    v = F.max_pool2d(xv.float(), 2).to(dtype).contiguous(memory_format=torch.channels_last).flatten(2)
    assert not q.is_contiguous() and v.stride(1) == 1
    return q, k, v


def _token_major(batch, d_qk, n, m, d_v, dtype, gen):
    """Transposes of (B, tokens, channels) tensors, as transformer-style code holds them."""
    q = torch.randn(batch, n, d_qk, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(batch, m, d_qk, generator=gen).to(dtype).transpose(1, 2)
    v = torch.randn(batch, m, d_v, generator=gen).to(dtype).transpose(1, 2)
    return q, k, v


# (id, maker, B, d_qk, N, M, d_v): chosen so the set covers every awkward case once or twice
# while the whole file stays well under a minute on 2 cores. M = 40 takes full key tiles and a
# ragged one, M in {1, 9} only a ragged one, M = 32 only full ones (16-key interpreter tiles).
CASES = [
    ("dqk10_dv96_oddN_M40", _contiguous, 2, 10, 63, 40, 96),
    ("dqk3_dv5_M1", _contiguous, 1, 3, 17, 1, 5),
    ("dqk24_dv300_M9_below_tile", _contiguous, 2, 24, 36, 9, 300),
    ("dqk8_dv40_conv_pool_views", _conv_views, 2, 8, 49, 9, 40),
    ("dqk10_dv40_token_major_M32_whole_tiles", _token_major, 1, 10, 30, 32, 40),
]


def _run(q, k, v, backend, grad_out, grad_lse):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if backend is None:
        out, lse = reference_attention(*leaves, SCALE, return_lse=True)
    else:
        out, lse = spatial_attention(*leaves, scale=SCALE, backend=backend, return_lse=True)
    torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return [out, lse] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_out_lse_and_gradients_within_accuracy_rule_of_fp64(case, dtype):
    _check_accuracy_rule(*case, dtype)


@pytest.mark.parametrize("d_qk, d_v", [(1, 1), (256, 1024)], ids=["narrowest", "widest"])
def test_extreme_widths_within_accuracy_rule_of_fp64(d_qk, d_v):
    _check_accuracy_rule(f"widths_{d_qk}_{d_v}", _contiguous, 1, d_qk, 20, 17, d_v, torch.float32)


def _check_accuracy_rule(name, make, batch, d_qk, n, m, d_v, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v = make(batch, d_qk, n, m, d_v, dtype, gen)
    grad_out = torch.randn(batch, d_v, n, generator=gen)
    grad_lse = torch.randn(batch, n, generator=gen)

    want = _run(q.double(), k.double(), v.double(), None, grad_out.double(), grad_lse.double())
    naive = _run(q, k, v, None, grad_out, grad_lse)
    got = _run(q, k, v, "triton", grad_out, grad_lse)

    names = ["out", "lse", "dq", "dk", "dv"]
    for name, g, nv, w, ratio in zip(names, got, naive, want, [ERROR_RATIO_OUT] * 2 + [ERROR_RATIO_GRAD] * 3):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        assert g.dtype == (torch.float32 if name == "lse" else dtype), f"{name}: dtype {g.dtype}"
        bound = error_bound(max_abs_error(nv, w), ratio, dtype)
        err = max_abs_error(g, w)
        assert err <= bound, (
            f"{name}: error {err:.3g} against fp64 exceeds {ratio}x the naive {dtype} error "
            f"({max_abs_error(nv, w):.3g}) + floor; {describe_mismatch(g, w, 0.0, 0.0, name)}"
        )


def _scaled_to_logit_magnitude(batch, d_qk, n, m, d_v, magnitude, gen):
    """fp32 q, k, v with q and k scaled so that max |q.k| = magnitude."""
    q, k, v = _contiguous(batch, d_qk, n, m, d_v, torch.float32, gen)
    factor = (magnitude / float(torch.bmm(q.transpose(1, 2), k).abs().max())) ** 0.5
    return q * factor, k * factor, v


# Unscaled GAN logits reach |s| ~ 1e4, where the softmax is nearly one-hot and the naive path's
# largest probability is exactly 1: the backward must recompute the forward's logits bit for bit
# (whatever BLAS the interpreter's tl.dot uses) and p from the row max and sum, not the lse.
# benchmarks/large_logit_accuracy.py sweeps more magnitudes. Where the BLAS rounds q.k differently
# from torch's bmm (OPENBLAS_CORETYPE=Haswell here), the logits' own rounding decides the ratio:
# at d_qk 8, |s| 2.5e3, seed 0, an fp64 softmax and backward from those fp32 logits alone is
# 3.7x the naive dq error (the kernel adds nothing to it), so that case is not one of these.
@pytest.mark.parametrize("shape, magnitude", [
    ((2, 10, 63, 40, 96), 400), ((2, 10, 63, 40, 96), 1.1e4), ((2, 10, 63, 40, 96), 3e4),
    ((2, 8, 64, 64, 16), 1.1e4), ((2, 8, 64, 64, 16), 3e4),
], ids=lambda x: "B{}_dqk{}_N{}_M{}_dv{}".format(*x) if isinstance(x, tuple) else f"logits{x:g}")
def test_fp32_out_lse_and_gradients_within_accuracy_rule_at_large_unscaled_logits(shape, magnitude):
    gen = torch.Generator().manual_seed(0)
    q, k, v = _scaled_to_logit_magnitude(*shape, magnitude, gen)
    batch, _, n, _, d_v = shape
    grad_out, grad_lse = torch.randn(batch, d_v, n, generator=gen), torch.randn(batch, n, generator=gen)
    args = dict(scale=1.0, return_lse=True)
    runs = []
    for leaves, backend in (((q.double(), k.double(), v.double()), None), ((q, k, v), None), ((q, k, v), "triton")):
        leaves = [t.detach().requires_grad_() for t in leaves]
        if backend is None:
            out, lse = reference_attention(*leaves, **args)
        else:
            out, lse = spatial_attention(*leaves, backend=backend, **args)
        torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
        runs.append([out.detach(), lse.detach()] + [t.grad for t in leaves])
    want, naive, got = runs
    ratios = [ERROR_RATIO_OUT] * 2 + [ERROR_RATIO_GRAD] * 3
    for name, g, nv, w, ratio in zip(["out", "lse", "dq", "dk", "dv"], got, naive, want, ratios):
        bound = error_bound(max_abs_error(nv, w), ratio, torch.float32)
        assert max_abs_error(g, w) <= bound, (
            f"{name}: error {max_abs_error(g, w):.3g} > {bound:.3g} ({ratio}x naive {max_abs_error(nv, w):.3g} "
            f"+ floor); {describe_mismatch(g, w, 0.0, 0.0, name)}")


def test_fp16_large_logits_stay_finite_and_correct_where_naive_fp16_overflows():
    gen = torch.Generator().manual_seed(7)
    # |q.k| typically 1e4 to 3e4, the largest beyond 65504 (fp16 max), where the naive bmm overflows
    q = (torch.randn(2, 8, 40, generator=gen) * 90).half()
    k = (torch.randn(2, 8, 24, generator=gen) * 90).half()
    v = torch.randn(2, 16, 24, generator=gen).half()
    naive = reference_attention(q, k, v)
    assert not naive.isfinite().all(), "the case must overflow the naive fp16 path to be a test"
    out, lse = spatial_attention(q, k, v, backend="triton", return_lse=True)
    want, want_lse = reference_attention(q.double(), k.double(), v.double(), return_lse=True)
    assert out.isfinite().all() and lse.isfinite().all()
    assert float(want_lse.abs().max()) > 1e4
    assert_close(out, want, torch.float16, "out")
    assert_close(lse, want_lse, torch.float32, "lse", rtol=1e-6)


def test_scale_none_means_inverse_sqrt_d_qk_at_runtime():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _contiguous(1, 10, 20, 12, 16, torch.float32, gen)
    out = spatial_attention(q, k, v, scale=None, backend="triton")
    assert_close(out, reference_attention(q.double(), k.double(), v.double(), scale=10 ** -0.5), torch.float32)
    # a different runtime scale gives the matching (different) answer from the same kernel
    out2 = spatial_attention(q, k, v, scale=-2.0, backend="triton")
    assert_close(out2, reference_attention(q.double(), k.double(), v.double(), scale=-2.0), torch.float32)


# the lse ~ -400 case overflows exp2 on padded keys before they are masked to p = 0, on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_atomic_dq_backward_matches_two_pass_backward():
    from fastattn.kernels.backward import launch_backward
    from fastattn.kernels.configs import INTERPRETER_BACKWARD, pad_width
    from fastattn.backends.triton.ops import attention_forward_op

    gen = torch.Generator().manual_seed(5)
    cases = [(d_v, False) for d_v in (40, 96)]  # fused dK/dV, and d_v split across two launches
    cases.append((40, True))  # every logit below -89 and M=20 ragged: padded keys must get p = 0
    for d_v, very_negative in cases:
        q, k, v = _contiguous(2, 10, 33, 20, d_v, torch.float32, gen)
        if very_negative:  # q opposes a direction all keys share: lse around -400
            q, k = -q.abs() * 6 - 3, k.abs() * 6 + 3
        out, lse, stats = attention_forward_op(q, k, v, SCALE, "ieee")
        assert not very_negative or lse.max() < -89
        grad_out, grad_lse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
        results = []
        for atomic in (False, True):
            config = dataclasses.replace(INTERPRETER_BACKWARD, atomic_dq=atomic)
            results.append(launch_backward(lambda f: f, grad_out, grad_lse, q, k, v, out, stats, SCALE, "ieee",
                                           config, pad_width(10), pad_width(d_v)))
        for name, two_pass, one_pass in zip(("dq", "dk", "dv"), *results):
            assert two_pass.isfinite().all() and one_pass.isfinite().all(), f"{name} (d_v={d_v}) not finite"
            assert_close(one_pass, two_pass, torch.float32, f"{name} (d_v={d_v})", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dv_slice", [64, 128])
def test_wide_dv_split_paths_give_out_lse_and_gradients_within_accuracy_rule_of_fp64(dv_slice):
    """d_v = 150 at a tiny shape: three 64-wide forward value splits, the dK launch's dp summed
    over three 64-wide chunks, and the dV launch in 64- or 128-wide slices (a ragged last one;
    128 is wider than block_dv, as on the GPU where dv_slice 256 exceeds block_dv 128)."""
    from fastattn.backends.triton.ops import attention_forward_op
    from fastattn.kernels.backward import launch_backward
    from fastattn.kernels.configs import INTERPRETER_BACKWARD, pad_width

    batch, d_qk, n, m, d_v = 1, 8, 20, 17, 150
    gen = torch.Generator().manual_seed(17)
    q, k, v = _contiguous(batch, d_qk, n, m, d_v, torch.float32, gen)
    grad_out, grad_lse = torch.randn(batch, d_v, n, generator=gen), torch.randn(batch, n, generator=gen)
    want = _run(q.double(), k.double(), v.double(), None, grad_out.double(), grad_lse.double())
    naive = _run(q, k, v, None, grad_out, grad_lse)
    out, lse, stats = attention_forward_op(q, k, v, SCALE, "ieee")
    config = dataclasses.replace(INTERPRETER_BACKWARD, dv_slice=dv_slice)
    grads = launch_backward(lambda f: f, grad_out, grad_lse, q, k, v, out, stats, SCALE, "ieee", config,
                            pad_width(d_qk), pad_width(d_v))
    ratios = [ERROR_RATIO_OUT] * 2 + [ERROR_RATIO_GRAD] * 3
    for name, g, nv, w, ratio in zip(["out", "lse", "dq", "dk", "dv"], [out, lse, *grads], naive, want, ratios):
        bound = error_bound(max_abs_error(nv, w), ratio, torch.float32)
        assert max_abs_error(g, w) <= bound, (
            f"{name}: error {max_abs_error(g, w):.3g} > {bound:.3g} ({ratio}x naive {max_abs_error(nv, w):.3g} "
            f"+ floor); {describe_mismatch(g, w, 0.0, 0.0, name)}")


def test_repeated_runs_are_bitwise_identical_under_the_interpreter():
    gen = torch.Generator().manual_seed(11)
    q, k, v = _contiguous(1, 8, 40, 24, 40, torch.float16, gen)
    grad_out = torch.randn(1, 40, 40, generator=gen)
    first = _run(q, k, v, "triton", grad_out, torch.zeros(1, 40))
    second = _run(q, k, v, "triton", grad_out, torch.zeros(1, 40))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_zero_queries_give_empty_output_and_zero_key_gradients():
    q = torch.randn(2, 8, 0, requires_grad=True)
    k = torch.randn(2, 8, 5, requires_grad=True)
    v = torch.randn(2, 16, 5, requires_grad=True)
    out = spatial_attention(q, k, v, backend="triton")
    assert out.shape == (2, 16, 0)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def test_double_backward_for_gradient_penalties_matches_fp64_reference():
    """R1-style penalty: the second derivative through the triton backend is exact."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (t.requires_grad_() for t in _contiguous(1, 8, 10, 6, 16, torch.float32, gen))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]

    def penalty_grads(fn, q, k, v):
        (dq,) = torch.autograd.grad(fn(q, k, v).square().sum(), q, create_graph=True)
        return torch.autograd.grad(dq.square().sum(), (q, k, v))

    got = penalty_grads(lambda *t: spatial_attention(*t, backend="triton"), q, k, v)
    want = penalty_grads(reference_attention, *leaves)
    for name, g, w in zip(("d2q", "d2k", "d2v"), got, want):
        assert_close(g, w, torch.float32, name)


def test_stride_zero_upstream_gradient_of_sum_matches_fp64():
    # out.sum().backward() hands the op an expanded (all-zero-stride) grad_out
    gen = torch.Generator().manual_seed(13)
    q, k, v = (t.requires_grad_() for t in _contiguous(2, 10, 33, 20, 40, torch.float32, gen))
    spatial_attention(q, k, v, backend="triton").sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_attention(*leaves).sum().backward()
    for name, got, want in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), leaves):
        assert_close(got, want.grad, torch.float32, name)


def test_zero_value_channels_still_give_the_exact_lse_and_gradients():
    gen = torch.Generator().manual_seed(21)
    q, k, v = (t.requires_grad_() for t in _contiguous(2, 8, 20, 9, 0, torch.float32, gen))
    out, lse = spatial_attention(q, k, v, backend="triton", return_lse=True)
    assert out.shape == (2, 0, 20)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = reference_attention(*leaves, return_lse=True)
    assert_close(lse, want_lse, torch.float32, "lse")
    grad_lse = torch.randn(lse.shape, generator=gen)
    lse.backward(grad_lse)
    want_lse.backward(grad_lse.double())
    for name, got, want in zip(("dq", "dk"), (q.grad, k.grad), leaves):
        assert_close(got, want.grad, torch.float32, name)
