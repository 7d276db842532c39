"""Memory-efficient pure-PyTorch backend: runs everywhere (CPU and CUDA, fp64/fp32/fp16/bf16).

Forward walks over chunks of queries, keeps a running (B, chunk, M) logits buffer, and saves only
each query's row max and row sum of the softmax. Backward recomputes the logits chunk by chunk
with the forward's own arithmetic (`_logits`: same chunks, same bmm, same scale multiply, so the
same bits) and the probabilities as exp(s - row max) / row sum, exactly the forward's. No N x M
tensor is ever saved, and working memory is bounded by constants.TORCH_CHUNK_BYTES, not by N.

Why not recompute from the lse, exp(s - lse): the lse carries a rounding of |lse| * 2^-24
(relative), which lands in every probability. The naive softmax's largest term is exactly
exp(0) = 1; with unscaled GAN logits of |s| 1e4-3e4, exp(s - lse) was off by ~1e-3 and dv's fp32
error was 13-870x the naive path's (benchmarks/large_logit_accuracy.py).

Low precision: logits, softmax statistics and accumulators are fp32 (fp64 for fp64 inputs), so
unscaled GAN logits cannot overflow the way the naive fp16 bmm does.

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
from .chunked_grad import first_order_grads

__all__ = ["TorchChunkedBackend", "chunked_attention"]


def _rows_per_chunk(batch: int, n_keys: int, n_queries: int, acc: torch.dtype) -> int:
    """Query rows per chunk: TORCH_CHUNK_BYTES of logits; on one torch thread at most
    TORCH_CHUNK_BYTES_ONE_THREAD (one core's cache), but not below TORCH_CHUNK_MIN_ROWS_ONE_THREAD
    rows, under which the per-chunk matmuls of large-batch sites get too small (see constants.py)."""
    per_row = max(1, batch * n_keys * torch.empty((), dtype=acc).element_size())
    rows = constants.TORCH_CHUNK_BYTES // per_row
    if torch.get_num_threads() == 1:
        rows = min(rows, max(constants.TORCH_CHUNK_BYTES_ONE_THREAD // per_row,
                             constants.TORCH_CHUNK_MIN_ROWS_ONE_THREAD))
    return max(1, min(n_queries, rows))


def _chunks(n_queries: int, rows: int):
    for start in range(0, n_queries, rows):
        yield start, min(n_queries, start + rows)


def _buffer(storage: Tensor, batch: int, rows: int, n_keys: int) -> Tensor:
    """A contiguous (batch, rows, n_keys) view at the front of a reusable flat buffer."""
    return storage[: batch * rows * n_keys].view(batch, rows, n_keys)


def _logits(q: Tensor, k_acc: Tensor, start: int, stop: int, scale: float, out: Tensor) -> Tensor:
    """scale * q[:, :, start:stop]^T k into `out` (B, chunk, M), in k_acc's dtype. The forward and
    the backward both call this with the same chunks, so the backward's logits are the forward's
    bit for bit (the probabilities' cancellation near the row max depends on it)."""
    torch.bmm(q[:, :, start:stop].transpose(1, 2).to(k_acc.dtype), k_acc, out=out)
    if scale != 1.0:
        out.mul_(scale)
    return out


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, row_max, row_sum): the statistics are (B, N) in the accumulation dtype."""
    batch, _, n_queries = q.shape
    d_v, n_keys = v.shape[1], v.shape[2]
    acc = accumulation_dtype(q.dtype)
    k_acc, v_acc = k.to(acc), v.to(acc)
    out = torch.empty(batch, d_v, n_queries, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, n_queries, dtype=acc, device=q.device)
    row_maxes = torch.empty(batch, n_queries, dtype=acc, device=q.device)
    row_sums = torch.empty(batch, n_queries, dtype=acc, device=q.device)
    rows = _rows_per_chunk(batch, n_keys, n_queries, acc)
    storage = torch.empty(batch * rows * n_keys, dtype=acc, device=q.device)
    for start, stop in _chunks(n_queries, rows):
        p = _logits(q, k_acc, start, stop, scale, _buffer(storage, batch, stop - start, n_keys))
        row_max = p.amax(dim=-1, keepdim=True)
        p.sub_(row_max).exp_()
        row_sum = p.sum(dim=-1, keepdim=True)
        if stop - start == n_queries and out.dtype == acc:
            # one chunk holds every query (small N): write straight into out, no temporary
            torch.bmm(v_acc, p.transpose(1, 2), out=out).div_(row_sum.transpose(1, 2))
        else:
            out_chunk = torch.bmm(v_acc, p.transpose(1, 2))  # (B, d_v, chunk)
            out[:, :, start:stop] = out_chunk.div_(row_sum.transpose(1, 2))
        lse[:, start:stop] = (row_max + row_sum.log()).squeeze(-1)
        row_maxes[:, start:stop] = row_max.squeeze(-1)
        row_sums[:, start:stop] = row_sum.squeeze(-1)
    return out, lse, row_maxes, row_sums


def _backward(q, k, v, out, row_max, row_sum, grad_out, grad_lse, scale, needs):
    """Gradients (dq, dk, dv) with probabilities recomputed per query chunk from the forward's
    row max and row sum."""
    batch, d_qk, n_queries = q.shape
    n_keys = k.shape[2]
    acc = row_max.dtype
    k_acc, v_acc = k.to(acc), v.to(acc)
    grad_out = grad_out.to(acc)
    # delta_i = sum_c dO[c, i] * O[c, i]  (the softmax-backward row term); minus d lse_i.
    delta = (grad_out * out.to(acc)).sum(dim=1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    need_qk = needs[0] or needs[1]
    dq = torch.empty(batch, d_qk, n_queries, dtype=acc, device=q.device) if needs[0] else None
    dk = torch.zeros(batch, d_qk, n_keys, dtype=acc, device=q.device) if needs[1] else None
    dv = torch.zeros_like(v_acc) if needs[2] else None
    rows = _rows_per_chunk(batch, n_keys, n_queries, acc)
    storage_p = torch.empty(batch * rows * n_keys, dtype=acc, device=q.device)
    storage_dp = torch.empty_like(storage_p) if need_qk else None
    for start, stop in _chunks(n_queries, rows):
        q_chunk = q[:, :, start:stop].to(acc)  # (B, d_qk, c)
        do_chunk = grad_out[:, :, start:stop]  # (B, d_v, c)
        p = _logits(q, k_acc, start, stop, scale, _buffer(storage_p, batch, stop - start, n_keys))
        p.sub_(row_max[:, start:stop, None]).exp_().div_(row_sum[:, start:stop, None])
        if dv is not None:
            dv.baddbmm_(do_chunk, p)
        if not need_qk:
            continue
        ds = _buffer(storage_dp, batch, stop - start, n_keys)
        torch.bmm(do_chunk.transpose(1, 2), v_acc, out=ds)
        ds.sub_(delta[:, start:stop, None]).mul_(p)
        if scale != 1.0:
            ds.mul_(scale)
        if dq is not None:
            dq[:, :, start:stop] = torch.bmm(k_acc, ds.transpose(1, 2))
        if dk is not None:
            dk.baddbmm_(q_chunk, ds)
    return (
        dq.to(q.dtype) if dq is not None else None,
        dk.to(k.dtype) if dk is not None else None,
        dv.to(v.dtype) if dv is not None else None,
    )


def _no_autocast(device: torch.device):
    """Autocast would push the fp32 accumulation bmms down to fp16/bf16: the op picks its own
    precision (fp32 statistics and accumulators), so autocast is off inside it."""
    return torch.autocast(device.type, enabled=False)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        with _no_autocast(q.device):
            out, lse, row_max, row_sum = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, row_max, row_sum)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, row_max, row_sum = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        with _no_autocast(q.device):
            if torch.is_grad_enabled():
                def first_order(grad_out, grad_lse):
                    return _backward(q, k, v, out, row_max, row_sum, grad_out, grad_lse, ctx.scale, needs)
                return first_order_grads(first_order, q, k, v, out, grad_out, grad_lse, ctx.scale, needs) + (None,)
            return _backward(q, k, v, out, row_max, row_sum, grad_out, grad_lse, ctx.scale, needs) + (None,)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(out, lse) with lse in fp32 (fp64 for fp64 inputs); differentiable in q, k and v."""
    return _ChunkedAttention.apply(q, k, v, float(scale))


class TorchChunkedBackend(Backend):
    name = "torch"
    priority = 10

    def unsupported(self, q, k, v):
        return []

    def attention(self, q, k, v, scale):
        return chunked_attention(q, k, v, scale)
