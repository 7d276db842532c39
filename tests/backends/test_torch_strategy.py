"""The torch backend's per-size strategy (kept probabilities under a fixed byte budget, chunked
recomputation above it) and the sdpa backend: correctness against fp64 under the accuracy rule,
the memory bound, declared capabilities, and forced backends never substituted."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class _Allocations(TorchDispatchMode):
    """Bytes of the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _largest_and_saved(B, N, M):
    q, k, v = (t.requires_grad_() for t in _make(B, 8, N, M, 16, torch.float32)[:3])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        with _Allocations() as mode:
            out = spatial_attention(q, k, v, backend="torch")
            out.backward(torch.ones_like(out))
    return mode.largest, max(saved)


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


def test_automatic_choice_takes_sdpa_only_for_wide_equal_heads_and_a_forced_backend_is_never_replaced():
    d = constants.SDPA_AUTO_MIN_HEAD_DIM
    wide = torch.randn(1, d, 8), torch.randn(1, d, 4), torch.randn(1, d, 4)
    gan = torch.randn(1, 8, 16), torch.randn(1, 8, 4), torch.randn(1, 64, 4)
    assert select_backend(*wide).name == "sdpa"
    assert select_backend(*gan).name == "torch"
    assert select_backend(*wide, backend="torch").name == "torch"
    assert select_backend(*gan, backend="torch") is get_backend("torch")
    with pytest.raises(BackendUnavailableError):
        select_backend(*gan, backend="sdpa")


def test_tiny_training_forward_takes_torchs_own_autograd_and_larger_ones_the_kept_function():
    # (2, 37, 23) fp32 probabilities: 6.8 KiB, under TORCH_PLAIN_AUTOGRAD_BYTES
    small = [t.requires_grad_() for t in _make(2, 10, 37, 23, 30, torch.float32)[:3]]
    assert type(spatial_attention(*small, backend="torch").grad_fn).__name__ == "BmmBackward0"
    _check_rule(lambda q, k, v, s: spatial_attention(q, k, v, scale=s, backend="torch"), SHAPES[1], torch.float32)
    side = int((constants.TORCH_PLAIN_AUTOGRAD_BYTES // 4) ** 0.5) + 1
    large = [t.requires_grad_() for t in _make(1, 4, side, side, 4, torch.float32)[:3]]
    assert "Backward" in type(spatial_attention(*large, backend="torch").grad_fn).__name__
    assert type(spatial_attention(*large, backend="torch").grad_fn).__name__ != "BmmBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would lower torch's own bmm
        assert spatial_attention(*small, backend="torch").dtype == torch.float32


def test_one_thread_chunks_fit_the_one_thread_budget_but_keep_a_minimum_of_rows(monkeypatch):
    from fastattn.backends.torch_chunked import _rows_per_chunk

    f32 = torch.float32
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # biggan256_G128, B=1: 16 KiB rows, 2 MiB -> 128 rows; studiogan64_G B=119: 119 KiB rows -> 68
        # rows (the minimum of 128 capped by the general 8 MiB budget)
        assert _rows_per_chunk(1, 4096, 16384, f32) == constants.TORCH_CHUNK_BYTES_ONE_THREAD // (4096 * 4)
        assert _rows_per_chunk(119, 256, 1024, f32) == min(constants.TORCH_CHUNK_BYTES // (119 * 256 * 4),
                                                           constants.TORCH_CHUNK_MIN_ROWS_ONE_THREAD)
        monkeypatch.setattr(constants, "TORCH_CHUNK_BYTES", 1024)  # tests that force many chunks still do
        assert _rows_per_chunk(1, 64, 1000, f32) == 4
        torch.set_num_threads(2)
        assert _rows_per_chunk(1, 64, 1000, f32) == 4
    finally:
        torch.set_num_threads(threads)
