"""Memory-efficient pure-PyTorch backend: runs everywhere (CPU and CUDA, fp64/fp32/fp16/bf16).

The work is split into blocks of (samples, query rows); each block's (b, rows, M) logits and
probabilities live in two reused buffers of at most constants.TORCH_CHUNK_BYTES (one core's L2
on one thread), so working memory is bounded whatever N and B are, and no N x M tensor is saved.

Forward, per block: logits by one bmm (then the scale multiply, as the naive layer does), torch's
fused softmax over whole rows, and the block's output by one bmm. Backward, per block: the same
logits from the same bmm on the same block, the same softmax (so the forward's probabilities, bit
for bit), then dv += dO P, dS = P * (dO^T v - delta) with delta_i = dO_i . O_i (minus d lse_i),
dq = scale k dS^T and dk += scale q dS (the scale rides on the O((N + M) d) matmuls, not on the
block).

Why a softmax from scratch instead of saved row statistics: each block holds whole rows, so the
fused softmax recomputes them in one vectorised kernel (three passes in cache) where exp(s - m) / l
from saved statistics takes three separate kernels; and no saved statistic can go stale. It is
the naive softmax's arithmetic: the largest term of a row is exactly exp(0) = 1, so unscaled GAN
logits of |s| 1e4-3e4 lose nothing (recomputing from the lse, exp(s - lse), would put the lse's
|lse| * 2^-24 rounding into every probability: benchmarks/large_logit_accuracy.py).

Blocks hold all samples and as many rows as fit the budget; when that is fewer than
constants.TORCH_CHUNK_MIN_ROWS rows (a large batch), a block takes that many rows of fewer samples
instead, so each block's matmuls keep a useful size (constants.py has the measurements).

Low precision: logits, softmax and accumulators are fp32 (fp64 for fp64 inputs), so unscaled GAN
logits cannot overflow the way the naive fp16 bmm does.

Double backward (gradient penalties such as R1 or WGAN-GP on a discriminator with attention)
is supported: under create_graph the backward is chunked_grad.FirstOrderGrads, whose own
backward recomputes the probabilities chunk by chunk again, so it never holds an N x M tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import constants
from ..dispatch import Backend
from ..reference import accumulation_dtype
from .chunked_grad import attention_backward, no_autocast

__all__ = ["TorchChunkedBackend", "chunked_attention", "chunked_out", "chunked_backward", "block_shape",
           "chunk_budget", "matrix_bytes"]


def matrix_bytes(batch: int, n_queries: int, n_keys: int, acc: torch.dtype) -> tuple[int, int]:
    """(bytes of one sample's (N, M) matrix, bytes of all B of them) in the accumulation dtype."""
    per_sample = n_queries * n_keys * (8 if acc == torch.float64 else 4)
    return per_sample, batch * per_sample


def chunk_budget() -> int:
    """Bytes of one (samples, rows, M) block buffer: TORCH_CHUNK_BYTES, or at most
    TORCH_CHUNK_BYTES_ONE_THREAD (one core's L2) on one torch thread."""
    if torch.get_num_threads() == 1:
        return min(constants.TORCH_CHUNK_BYTES, constants.TORCH_CHUNK_BYTES_ONE_THREAD)
    return constants.TORCH_CHUNK_BYTES


def block_shape(batch: int, n_queries: int, n_keys: int, acc: torch.dtype) -> tuple[int, int]:
    """(samples, query rows) per block: a (samples, rows, M) buffer in `acc` takes at most the
    chunk budget (TORCH_CHUNK_BYTES, or TORCH_CHUNK_BYTES_ONE_THREAD on one torch thread). All
    samples when that leaves at least TORCH_CHUNK_MIN_ROWS rows; otherwise up to that many rows
    (as many as one sample's budget allows) and as many samples as then fit."""
    budget = chunk_budget()
    per_row = max(1, matrix_bytes(1, 1, n_keys, acc)[0])
    rows = budget // (max(1, batch) * per_row)
    if rows >= min(n_queries, constants.TORCH_CHUNK_MIN_ROWS):
        return max(1, batch), max(1, min(n_queries, rows))
    rows = max(1, min(n_queries, constants.TORCH_CHUNK_MIN_ROWS, budget // per_row))
    return max(1, min(batch, budget // (rows * per_row))), rows


def _blocks(batch: int, n_queries: int, samples: int, rows: int):
    for b0 in range(0, batch, samples):
        b1 = min(batch, b0 + samples)
        for r0 in range(0, n_queries, rows):
            yield b0, b1, r0, min(n_queries, r0 + rows)


def _view(storage: Tensor, samples: int, rows: int, n_keys: int) -> Tensor:
    """A contiguous (samples, rows, n_keys) view at the front of a reusable flat buffer."""
    return storage[: samples * rows * n_keys].view(samples, rows, n_keys)


def _probs(q_acc: Tensor, k_acc: Tensor, b0: int, b1: int, r0: int, r1: int, scale: float,
           s_storage: Tensor, p_storage: Tensor) -> tuple[Tensor, Tensor]:
    """(logits buffer, probabilities) of one block: scale * q^T k then torch's softmax over whole
    rows. The forward and the backward call it on the same blocks, so they get the same bits."""
    s = _view(s_storage, b1 - b0, r1 - r0, k_acc.shape[2])
    torch.bmm(q_acc[b0:b1, :, r0:r1].transpose(1, 2), k_acc[b0:b1], out=s)
    if scale != 1.0:
        s.mul_(scale)
    p = torch._softmax(s, -1, False, out=_view(p_storage, b1 - b0, r1 - r0, k_acc.shape[2]))
    return s, p


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """(out, lse or None); lse is (B, N) in the accumulation dtype."""
    batch, _, n_queries = q.shape
    d_v, n_keys = v.shape[1], v.shape[2]
    acc = accumulation_dtype(q.dtype)
    q_acc, k_acc, v_acc = q.to(acc), k.to(acc), v.to(acc)
    out = torch.empty(batch, d_v, n_queries, dtype=acc, device=q.device)
    lse = torch.empty(batch, n_queries, dtype=acc, device=q.device) if need_lse else None
    samples, rows = block_shape(batch, n_queries, n_keys, acc)
    s_storage = torch.empty(samples * rows * n_keys, dtype=acc, device=q.device)
    p_storage = torch.empty_like(s_storage)
    for b0, b1, r0, r1 in _blocks(batch, n_queries, samples, rows):
        s, p = _probs(q_acc, k_acc, b0, b1, r0, r1, scale, s_storage, p_storage)
        if lse is not None:  # one more pass over the block, only when asked for
            lse[b0:b1, r0:r1] = torch.logsumexp(s, dim=-1)
        torch.bmm(v_acc[b0:b1], p.transpose(1, 2), out=out[b0:b1, :, r0:r1])
    return out.to(q.dtype), lse


def chunked_backward(q, k, v, out, grad_out, grad_lse, scale, needs):
    """Gradients (dq, dk, dv), None where `needs` is False, with each block's probabilities
    recomputed as the forward computed them. `out` is the forward's output (for delta)."""
    batch, d_qk, n_queries = q.shape
    n_keys = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    q_acc, k_acc, v_acc = q.to(acc), k.to(acc), v.to(acc)
    grad_out = grad_out.to(acc)
    need_qk = needs[0] or needs[1]
    dq = torch.empty(batch, d_qk, n_queries, dtype=acc, device=q.device) if needs[0] else None
    dk = torch.zeros(batch, d_qk, n_keys, dtype=acc, device=q.device) if needs[1] else None
    dv = torch.zeros_like(v_acc) if needs[2] else None
    if need_qk:
        # delta_i = sum_c dO[c, i] * O[c, i] (the softmax backward's row term), minus d lse_i
        delta = (grad_out * out.to(acc)).sum(dim=1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(acc)
        k_scaled = k_acc * scale if scale != 1.0 else k_acc
    samples, rows = block_shape(batch, n_queries, n_keys, acc)
    s_storage = torch.empty(samples * rows * n_keys, dtype=acc, device=q.device)
    p_storage = torch.empty_like(s_storage)
    for b0, b1, r0, r1 in _blocks(batch, n_queries, samples, rows):
        s, p = _probs(q_acc, k_acc, b0, b1, r0, r1, scale, s_storage, p_storage)
        do_block = grad_out[b0:b1, :, r0:r1]  # (b, d_v, rows)
        if dv is not None:
            dv[b0:b1].baddbmm_(do_block, p)
        if not need_qk:
            continue
        ds = torch.bmm(do_block.transpose(1, 2), v_acc[b0:b1], out=s)  # dP, over the spent logits
        ds.sub_(delta[b0:b1, r0:r1, None]).mul_(p)
        if dq is not None:
            torch.bmm(k_scaled[b0:b1], ds.transpose(1, 2), out=dq[b0:b1, :, r0:r1])
        if dk is not None:
            dk[b0:b1].baddbmm_(q_acc[b0:b1, :, r0:r1], ds, alpha=scale)
    return (
        dq.to(q.dtype) if dq is not None else None,
        dk.to(k.dtype) if dk is not None else None,
        dv.to(v.dtype) if dv is not None else None,
    )


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, need_lse):
        with no_autocast(q.device):
            out, lse = _forward(q, k, v, scale, need_lse)
        ctx.save_for_backward(q, k, v, out)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return out, (lse if lse is not None else out.new_empty(0, dtype=accumulation_dtype(q.dtype)))

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_lse is not None and grad_lse.numel() == 0:  # lse was not computed (need_lse=False)
            grad_lse = None
        if grad_out is None:
            grad_out = torch.zeros_like(out)

        def first_order(grad_out, grad_lse):
            return chunked_backward(q, k, v, out, grad_out, grad_lse, ctx.scale, needs)
        return attention_backward(first_order, q, k, v, out, grad_out, grad_lse, ctx.scale, needs) + (None, None)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0,
                      need_lse: bool = True) -> tuple[Tensor, Tensor]:
    """(out, lse) with lse in fp32 (fp64 for fp64 inputs); differentiable in q, k and v.
    need_lse=False leaves lse empty (and saves its pass over each block)."""
    return _ChunkedAttention.apply(q, k, v, float(scale), need_lse)


def chunked_out(q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0) -> Tensor:
    """out alone, without a graph (an inference forward)."""
    with no_autocast(q.device):
        return _forward(q, k, v, float(scale), False)[0]


class TorchChunkedBackend(Backend):
    name = "torch"
    priority = 10

    def unsupported(self, q, k, v):
        return []

    def attention(self, q, k, v, scale):
        return chunked_attention(q, k, v, scale)
