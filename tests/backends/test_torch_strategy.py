"""The torch backend's per-size strategy (kept probabilities under a fixed byte budget, chunked
recomputation above it) and the sdpa backend: correctness against fp64 under the accuracy rule,
the memory bound, declared capabilities, and forced backends never substituted."""
import pytest
import torch

from allocations import LargestTensor
from fastattn import BackendUnavailableError, constants, spatial_attention
from fastattn.backends.sdpa import SdpaBackend
from fastattn.backends.torch_small import keeps_probabilities
from fastattn.constants import ERROR_RATIO_GRAD, ERROR_RATIO_OUT
from fastattn.dispatch import get_backend, select_backend
from fastattn.reference import reference_attention
from fastattn.testing import error_bound, max_abs_error

# (B, d_qk, N, M, d_v, scale): a CIFAR-10 G site, an awkward ragged one, a wide head (sdpa-able)
SHAPES = [(2, 48, 256, 64, 192, 1.0), (2, 10, 37, 23, 300, 0.7), (1, 64, 96, 80, 64, 64 ** -0.5)]


def _make(B, d_qk, N, M, d_v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, n, generator=g, dtype=torch.float64).to(dtype)
            for d, n in ((d_qk, N), (d_qk, M), (d_v, M), (d_v, N))]


def _run(fn, q, k, v, grad_out, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


def _check_rule(fn, shape, dtype):
    *dims, scale = shape
    q, k, v, g = _make(*dims, dtype)
    ref = _run(reference_attention, *(t.double() for t in (q, k, v, g)), scale)
    naive = _run(reference_attention, q, k, v, g, scale)
    got = _run(fn, q, k, v, g, scale)
    for i, (a, n, r) in enumerate(zip(got, naive, ref)):
        ratio = ERROR_RATIO_OUT if i == 0 else ERROR_RATIO_GRAD
        assert a.dtype == dtype and a.shape == r.shape
        assert max_abs_error(a, r) <= error_bound(max_abs_error(n, r), ratio, dtype), (i, max_abs_error(a, r))


@pytest.mark.parametrize("keep_bytes", [0, 2**30], ids=["chunked", "kept"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=["cifar_G", "ragged"])
def test_both_torch_strategies_meet_the_accuracy_rule_against_fp64(shape, dtype, keep_bytes, monkeypatch):
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_BYTES", keep_bytes)
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_SMALL_SAMPLE_BYTES", keep_bytes)
    _check_rule(lambda q, k, v, s: spatial_attention(q, k, v, scale=s, backend="torch"), shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_backend_meets_the_accuracy_rule_against_fp64(dtype):
    _check_rule(lambda q, k, v, s: spatial_attention(q, k, v, scale=s, backend="sdpa"), SHAPES[2], dtype)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_lse_its_gradient_and_double_backward_match_the_reference_in_fp64(backend, monkeypatch):
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_BYTES", 2**30)  # kept path for torch
    q, k, v = (t.requires_grad_() for t in _make(1, 6, 9, 7, 6, torch.float64)[:3])
    fn = lambda a, b, c: spatial_attention(a, b, c, scale=0.8, backend=backend, return_lse=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))
    out, lse = fn(q, k, v)
    want_out, want_lse = reference_attention(q, k, v, 0.8, return_lse=True)
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(out, want_out)


def _largest_and_saved(B, N, M):
    q, k, v = (t.requires_grad_() for t in _make(B, 8, N, M, 16, torch.float32)[:3])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        with LargestTensor() as mode:
            out = spatial_attention(q, k, v, backend="torch")
            out.backward(torch.ones_like(out))
    return mode.largest_bytes, max(saved)


def test_probabilities_are_kept_only_under_the_fixed_byte_budget(monkeypatch):
    budget = 256 * 2**10
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_BYTES", budget)
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_SMALL_SAMPLE_BYTES", 0)
    monkeypatch.setattr(constants, "TORCH_CHUNK_BYTES", 32 * 2**10)
    assert keeps_probabilities(1, 256, 256, torch.float32) and not keeps_probabilities(2, 256, 256, torch.float32)
    largest, saved = _largest_and_saved(1, 256, 256)  # 256 KiB of probabilities: kept
    assert saved == 256 * 256 * 4 and largest <= budget
    largest, saved = _largest_and_saved(4, 256, 256)  # 1 MiB: over the budget, chunked
    assert saved < 256 * 256 * 4 and largest <= max(budget // 4, 4 * 16 * 256 * 4)  # io-sized or a chunk


class _MatrixAllocations(LargestTensor):
    """Also collects the distinct buffers of `numel` elements that ops return (a view or an
    out= result is the buffer it shares); `count` is how many there were."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.buffers = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.buffers |= {t.untyped_storage().data_ptr() for t in (out if isinstance(out, (tuple, list)) else (out,))
                         if isinstance(t, torch.Tensor) and t.numel() == self.numel}
        return out

    @property
    def count(self):
        return len(self.buffers)


def test_an_inference_forward_holds_one_matrix_where_the_naive_layer_holds_two_and_blocks_above_the_budget():
    B, N, M = 2, 96, 40
    q, k, v = _make(B, 8, N, M, 24, torch.float32)[:3]
    assert keeps_probabilities(B, N, M, torch.float32)
    with torch.no_grad():
        with _MatrixAllocations(B * N * M) as naive:
            want = reference_attention(q, k, v)
        with _MatrixAllocations(B * N * M) as ours:
            got = spatial_attention(q, k, v, backend="torch")
    assert (naive.count, ours.count) == (2, 1)  # logits and probabilities vs one, softmax in place
    assert torch.equal(got, want)  # the same three ops: bit for bit
    big = _make(4, 8, 1024, 1024, 16, torch.float32)[:3]  # 16 MiB of 4 MiB samples: over the budget
    assert not keeps_probabilities(4, 1024, 1024, torch.float32)
    with torch.no_grad(), LargestTensor() as blocked:
        spatial_attention(*big, backend="torch")
    assert blocked.largest_bytes <= constants.TORCH_CHUNK_BYTES


def test_many_tiny_samples_are_kept_up_to_the_second_fixed_cap():
    assert keeps_probabilities(256, 256, 64, torch.float32)  # CIFAR G at B=256: 16 MiB of 64 KiB samples
    assert not keeps_probabilities(257, 256, 64, torch.float32)
    assert not keeps_probabilities(4, 1024, 1024, torch.float32)  # 16 MiB of 4 MiB samples: chunked


def test_sdpa_backend_declares_what_it_cannot_take_with_reasons():
    sdpa = SdpaBackend()
    assert sdpa.unavailable() == []
    q, k, v = torch.randn(1, 8, 10), torch.randn(1, 8, 6), torch.randn(1, 16, 6)
    assert any("d_qk == d_v" in r and "d_qk=8, d_v=16" in r for r in sdpa.unsupported(q, k, v))
    with pytest.raises(BackendUnavailableError, match=r"(?s)'sdpa'.*d_qk == d_v"):
        spatial_attention(q, k, v, backend="sdpa")
    narrow = torch.randn(1, 8, 10), torch.randn(1, 8, 6), torch.randn(1, 8, 6)
    assert sdpa.unsupported(*narrow) == []
    assert "SDPA_AUTO_MIN_HEAD_DIM" in " ".join(sdpa.not_automatic(*narrow))


def test_automatic_choice_takes_sdpa_only_for_wide_equal_heads_and_a_forced_backend_is_never_replaced(monkeypatch):
    monkeypatch.setattr(constants, "SDPA_AUTO_MIN_PAIRS", 32)  # small tensors stand for large N x M
    d = constants.SDPA_AUTO_MIN_HEAD_DIM
    wide = torch.randn(1, d, 8), torch.randn(1, d, 4), torch.randn(1, d, 4)
    few_pairs = torch.randn(1, d, 7), torch.randn(1, d, 4), torch.randn(1, d, 4)  # 28 pairs
    narrower = torch.randn(1, d - 1, 8), torch.randn(1, d - 1, 4), torch.randn(1, d - 1, 4)
    gan = torch.randn(1, 8, 16), torch.randn(1, 8, 4), torch.randn(1, 64, 4)
    assert select_backend(*wide).name == "sdpa"
    assert select_backend(*few_pairs).name == "torch"
    assert "SDPA_AUTO_MIN_PAIRS" in " ".join(SdpaBackend().not_automatic(*few_pairs))
    assert select_backend(*narrower).name == "torch"
    assert select_backend(*gan).name == "torch"
    assert select_backend(*wide, backend="torch").name == "torch"
    assert select_backend(*gan, backend="torch") is get_backend("torch")
    with pytest.raises(BackendUnavailableError):
        select_backend(*gan, backend="sdpa")


def test_small_training_forward_takes_torchs_own_autograd_and_larger_ones_the_kept_function():
    # (2, 37, 23) fp32 probabilities: 6.8 KiB, under TORCH_PLAIN_AUTOGRAD_BYTES
    small = [t.requires_grad_() for t in _make(2, 10, 37, 23, 30, torch.float32)[:3]]
    assert type(spatial_attention(*small, backend="torch").grad_fn).__name__ == "BmmBackward0"
    _check_rule(lambda q, k, v, s: spatial_attention(q, k, v, scale=s, backend="torch"), SHAPES[1], torch.float32)
    def node(B, N, M):
        q, k, v = [t.requires_grad_() for t in _make(B, 4, N, M, 4, torch.float32)[:3]]
        return type(spatial_attention(q, k, v, backend="torch").grad_fn).__name__

    assert constants.TORCH_PLAIN_AUTOGRAD_BYTES == 512 * 2**10  # the cases below assume them
    assert constants.TORCH_PLAIN_AUTOGRAD_SAMPLE_BYTES == 256 * 2**10
    assert node(8, 256, 64) == "BmmBackward0"  # cifar_G B=8: 8 samples of 64 KiB, 512 KiB in all
    assert node(9, 256, 64) != "BmmBackward0"  # 576 KiB in all: the Function
    assert node(1, 256, 256) == "BmmBackward0"  # one 256 KiB sample
    assert node(1, 257, 256) != "BmmBackward0"  # one sample over 256 KiB: the Function
    assert "Backward" in node(1, 257, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would lower torch's own bmm
        assert spatial_attention(*small, backend="torch").dtype == torch.float32


def test_blocks_fit_the_budget_and_split_the_batch_to_keep_a_minimum_of_rows(monkeypatch):
    from fastattn.backends.torch_chunked import _blocks, block_shape

    f32, f64 = torch.float32, torch.float64
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        budget = constants.TORCH_CHUNK_BYTES_ONE_THREAD
        assert budget == 2 * 2**20 and constants.TORCH_CHUNK_MIN_ROWS == 128  # the cases below assume them
        assert block_shape(1, 16384, 4096, f32) == (1, 128)  # biggan256_G128 B=1: 16 KiB rows
        assert block_shape(8, 4096, 1024, f32) == (4, 128)  # biggan128_G B=8: 8 samples x 64 rows -> 4 x 128
        assert block_shape(119, 1024, 256, f32) == (16, 128)  # studiogan64_G B=119: not 119 x 17 rows
        assert block_shape(42, 1024, 1024, f64) == (2, 128)  # fp64 rows are twice the bytes
        assert block_shape(2, 100, 64, f32) == (2, 100)  # everything fits one block
        for batch, n_queries, n_keys in ((119, 1024, 256), (42, 1024, 1024), (8, 4096, 1024)):
            samples, rows = block_shape(batch, n_queries, n_keys, f32)
            assert samples * rows * n_keys * 4 <= budget
        torch.set_num_threads(2)
        assert block_shape(119, 1024, 256, f32) == (64, 128)  # 8 MiB with more than one thread
        monkeypatch.setattr(constants, "TORCH_CHUNK_BYTES", 1024)  # tests that force many blocks still get them
        assert block_shape(3, 1000, 64, f32) == (1, 4)
    finally:
        torch.set_num_threads(threads)
    # every (sample, query) pair is in exactly one block, ragged last blocks included
    seen = torch.zeros(5, 11, dtype=torch.int64)
    for b0, b1, r0, r1 in _blocks(5, 11, 2, 3):
        seen[b0:b1, r0:r1] += 1
    assert bool((seen == 1).all())


def test_blocks_of_some_samples_and_rows_give_the_fp64_reference_out_lse_and_gradients(monkeypatch):
    """Ragged blocks of 2 of 5 samples x 3 of 13 rows: out, lse and all gradients (lse's too)."""
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_BYTES", 0)  # the blocked strategy
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_SMALL_SAMPLE_BYTES", 0)
    monkeypatch.setattr(constants, "TORCH_CHUNK_MIN_ROWS", 3)
    monkeypatch.setattr(constants, "TORCH_CHUNK_BYTES", 2 * 3 * 7 * 8)  # fp64: 2 samples x 3 rows x 7 keys
    from fastattn.backends.torch_chunked import block_shape
    assert block_shape(5, 13, 7, torch.float64) == (2, 3)
    q, k, v, g = (t.requires_grad_(i < 3) for i, t in enumerate(_make(5, 4, 13, 7, 6, torch.float64)))
    out, lse = spatial_attention(q, k, v, scale=0.6, backend="torch", return_lse=True)
    want_out, want_lse = reference_attention(q, k, v, 0.6, return_lse=True)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(lse)
    got = torch.autograd.grad((out * g).sum() + (lse * w).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * g).sum() + (want_lse * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the inference forward takes the same blocks
        torch.testing.assert_close(spatial_attention(q, k, v, scale=0.6, backend="torch"), want_out,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B, N", [(0, 10), (2, 0)], ids=["no samples", "no queries"])
def test_the_blocked_path_gives_empty_results_and_gradients_for_empty_inputs(B, N):
    from fastattn.backends.torch_chunked import chunked_attention, chunked_out

    q = torch.randn(B, 4, N, requires_grad=True)
    k, v = torch.randn(B, 4, 5, requires_grad=True), torch.randn(B, 3, 5, requires_grad=True)
    out, lse = chunked_attention(q, k, v)
    assert out.shape == (B, 3, N) and lse.shape == (B, N) and chunked_out(q, k, v).shape == (B, 3, N)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.abs().sum() == 0 and v.grad.abs().sum() == 0


@pytest.mark.parametrize("scale", [1.0, 0.8])
def test_token_major_plain_autograd_path_gradcheck_and_double_backward_fp64(scale):
    """The small training path (torch's own autograd, logits built as (B, M, N) and softmax over
    dim 1) differentiates to the reference, twice (R1 / WGAN-GP penalties take this path too)."""
    q, k, v = (t.requires_grad_() for t in _make(2, 5, 9, 7, 6, torch.float64)[:3])
    fn = lambda a, b, c: spatial_attention(a, b, c, scale=scale, backend="torch")
    assert type(fn(q, k, v).grad_fn).__name__ == "BmmBackward0"  # the plain path, not the Function
    torch.testing.assert_close(fn(q, k, v), reference_attention(q, k, v, scale), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))
