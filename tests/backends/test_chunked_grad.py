"""Double backward (gradient penalties) through attention: exactness in fp64, the accuracy rule in
low precision, and the memory property (no N x M tensor held), on both backends."""
import itertools
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastattn import constants, spatial_attention
from fastattn.constants import ERROR_RATIO_GRAD
from fastattn.reference import reference_attention
from fastattn.testing import error_bound, max_abs_error


def make(B, d_qk, N, M, d_v, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, n, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for d, n in ((d_qk, N), (d_qk, M), (d_v, M))]


def small_chunks(monkeypatch, nbytes):
    """The torch backend's chunked strategy (not kept probabilities), with chunk budgets of the
    first-order and the double backward that make both walk several chunks."""
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_BYTES", 0)
    monkeypatch.setattr(constants, "TORCH_KEEP_PROBS_SMALL_SAMPLE_BYTES", 0)
    monkeypatch.setattr(constants, "TORCH_CHUNK_BYTES", nbytes)
    monkeypatch.setattr(constants, "DOUBLE_BACKWARD_CHUNK_BYTES", nbytes)


def attention_fn(backend, scale):
    def fn(q, k, v):
        if backend is None:
            return reference_attention(q, k, v, scale, return_lse=True)
        return spatial_attention(q, k, v, scale=scale, backend=backend, return_lse=True)
    return fn


def penalty_grads(fn, q, k, v, on=(True, True, True), weight=None):
    """R1-style: grads of sum |d loss / d x|^2 over the x in `on`, loss = <weight, out> + sum sin(lse)."""
    out, lse = fn(q, k, v)
    weight = torch.ones_like(out) if weight is None else weight.to(out.dtype)
    loss = (out * weight).sum() + lse.sin().sum()
    first = torch.autograd.grad(loss, (q, k, v), create_graph=True)
    penalty = sum(g.float().square().sum() for g, use in zip(first, on) if use)
    got = torch.autograd.grad(penalty, (q, k, v), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, (q, k, v))]


# (B, d_qk, N, M, d_v): ragged N and M, d_qk 1 and 10, d_v not a power of two
AWKWARD = [(2, 3, 7, 5, 6), (1, 1, 9, 4, 3), (2, 10, 5, 3, 5)]


@pytest.fixture(autouse=True)
def _no_plain_autograd(monkeypatch):
    """Tiny training calls (TORCH_PLAIN_AUTOGRAD_BYTES) run through torch's own autograd, whose
    graph is as small as they are; this module's tiny shapes stand for the larger calls that take
    FirstOrderGrads, so that shortcut is off here."""
    monkeypatch.setattr(constants, "TORCH_PLAIN_AUTOGRAD_BYTES", 0)


@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "B{}_dqk{}_N{}_M{}_dv{}".format(*s))
def test_gradgradcheck_fp64_torch_backend_over_several_chunks(shape, monkeypatch):
    small_chunks(monkeypatch, 2 * shape[0] * shape[3] * 8)  # 2 rows a chunk
    q, k, v = make(*shape)
    assert torch.autograd.gradgradcheck(attention_fn("torch", 0.6), (q, k, v))


def test_gradgradcheck_fp64_kept_probabilities_strategy(monkeypatch):
    """Small problems keep P for the first backward (torch_small.py) and save no output: the
    double backward then recomputes delta from P."""
    monkeypatch.setattr(constants, "DOUBLE_BACKWARD_CHUNK_BYTES", 2 * 5 * 8)
    q, k, v = make(1, 10, 7, 5, 3)
    assert torch.autograd.gradgradcheck(attention_fn("torch", 0.6), (q, k, v))


def test_gradgradcheck_fp64_sdpa_backend():
    from fastattn.dispatch import available_backends

    sdpa = available_backends().get("sdpa")
    if sdpa is None or sdpa.unavailable():
        pytest.skip("no sdpa backend here")
    q, k, v = make(1, 4, 6, 5, 4)  # the kernel needs d_qk == d_v
    assert torch.autograd.gradgradcheck(attention_fn("sdpa", 0.6), (q, k, v))


@pytest.mark.parametrize("keep", [True, False], ids=["kept_probs", "chunked"])
def test_double_backward_graph_runs_through_the_chunked_first_order_op(keep, monkeypatch):
    if not keep:
        small_chunks(monkeypatch, 2 * 3 * 8)
    q, k, v = make(1, 2, 5, 3, 3)
    out = spatial_attention(q, k, v, backend="torch")
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    assert all(type(g.grad_fn).__name__ == "FirstOrderGradsBackward" for g in (dq, dk, dv))


@pytest.mark.parametrize("on", [c for c in itertools.product((False, True), repeat=3) if any(c)],
                         ids=lambda c: "".join(n for n, u in zip(("q", "k", "v"), c) if u))
def test_penalty_on_any_subset_of_gradients_matches_naive_fp64(on, monkeypatch):
    """Upstream gradients that are None (no penalty on dq, dk or dv) take the skipping paths."""
    small_chunks(monkeypatch, 3 * 2 * 6 * 8)
    q, k, v = make(2, 4, 11, 6, 5)
    weight = torch.randn(2, 5, 11, dtype=torch.float64)
    got = penalty_grads(attention_fn("torch", 0.8), q, k, v, on, weight)
    want = penalty_grads(attention_fn(None, 0.8), q, k, v, on, weight)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"d/d{name} of the penalty")


def _check_penalty_grads_within_3x_of_naive_error(backend, dtype, shape, seed):
    """The penalty's gradients through `backend` in `dtype`, against fp64, within ERROR_RATIO_GRAD
    times the naive path's own error in `dtype`."""
    B, _, N, _, d_v = shape
    q64, k64, v64 = make(*shape, seed=seed)
    weight = torch.randn(B, d_v, N, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    want = penalty_grads(attention_fn(None, 0.5), q64, k64, v64, weight=weight)
    low = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
    naive = penalty_grads(attention_fn(None, 0.5), *low, weight=weight)
    got = penalty_grads(attention_fn(backend, 0.5), *low, weight=weight)
    for name, g, n, w in zip("qkv", got, naive, want):
        bound = error_bound(max_abs_error(n, w), ERROR_RATIO_GRAD, dtype)
        assert max_abs_error(g, w) <= bound, (name, max_abs_error(g, w), max_abs_error(n, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_penalty_grads_within_3x_of_naive_error(dtype):
    _check_penalty_grads_within_3x_of_naive_error("torch", dtype, (2, 8, 37, 19, 12), seed=3)


# --- memory --------------------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create while the mode is on and that are alive
    at the same time (a storage counts until the last tensor on it is freed)."""

    def __init__(self):
        super().__init__()
        self.refs, self.live, self.peak = {}, 0, 0

    def _drop(self, key):
        self.refs[key][0] -= 1
        if self.refs[key][0] == 0:
            self.live -= self.refs.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key not in self.refs:
                    self.refs[key] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[key][0] += 1
                weakref.finalize(t, self._drop, key)
        return out


def _r1_peak_bytes(fn, q, k, v):
    with _LiveBytes() as mode:
        grads = penalty_grads(fn, q, k, v)
        del grads
    return mode.peak


def test_r1_double_backward_peak_memory_is_a_fraction_of_naive(monkeypatch, one_thread):
    N, M = 512, 256
    budget = 16 * 1024  # 16 query rows per (1, rows, 256) fp32 buffer: 32 chunks
    small_chunks(monkeypatch, budget)
    q, k, v = make(1, 8, N, M, 16, torch.float32)
    naive = _r1_peak_bytes(attention_fn(None, 1.0), q, k, v)
    ours = _r1_peak_bytes(attention_fn("torch", 1.0), q, k, v)
    n_by_m = N * M * 4
    assert naive > 4 * n_by_m  # the naive graph keeps several N x M matrices
    print(f"R1 peak live bytes: naive {naive}, torch chunked {ours}, one N x M {n_by_m}")
    assert ours < n_by_m and ours < naive / 10, (ours, naive, n_by_m)


# --- Triton backend under the interpreter (first-order grads on the kernels) ------------------
def _interpreted_triton():
    pytest.importorskip("triton")
    from fastattn.kernels.autotune import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")


@pytest.mark.interpreter
def test_gradgradcheck_triton_backend_fp32_loose(monkeypatch):
    """Triton has no fp64, so the check runs in fp32 with finite-difference tolerances; the
    second-order math itself is checked exactly in fp64 on the torch backend above."""
    _interpreted_triton()
    small_chunks(monkeypatch, 2 * 3 * 4)  # 2 rows a chunk
    q, k, v = make(1, 1, 5, 3, 3, torch.float32, seed=1)  # d_qk 1, ragged
    with pytest.warns(UserWarning):  # gradcheck warns about fp32 inputs
        assert torch.autograd.gradgradcheck(attention_fn("triton", 0.6), (q, k, v), eps=1e-2, atol=2e-2, rtol=2e-2,
                                              fast_mode=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_penalty_grads_within_3x_of_naive_error(dtype):
    _interpreted_triton()
    # ragged against the 16-key interpreter tile
    _check_penalty_grads_within_3x_of_naive_error("triton", dtype, (1, 10, 21, 17, 5), seed=7)
