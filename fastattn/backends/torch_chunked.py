"""Memory-efficient pure-PyTorch backend: runs everywhere (CPU and CUDA, fp64/fp32/fp16/bf16).

Forward walks over chunks of queries, keeps a running (B, chunk, M) logits buffer, and saves only
the per-query log-sum-exp. Backward recomputes the probabilities chunk by chunk from it. No
N x M tensor is ever saved, and working memory is bounded by constants.TORCH_CHUNK_BYTES, not by N.

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

__all__ = ["TorchChunkedBackend", "chunked_attention", "differentiable_grads"]


def _rows_per_chunk(batch: int, n_keys: int, n_queries: int, acc: torch.dtype) -> int:
    per_row = max(1, batch * n_keys * torch.empty((), dtype=acc).element_size())
    return max(1, min(n_queries, constants.TORCH_CHUNK_BYTES // per_row))


def _chunks(n_queries: int, rows: int):
    for start in range(0, n_queries, rows):
        yield start, min(n_queries, start + rows)


def _buffer(storage: Tensor, batch: int, rows: int, n_keys: int) -> Tensor:
    """A contiguous (batch, rows, n_keys) view at the front of a reusable flat buffer."""
    return storage[: batch * rows * n_keys].view(batch, rows, n_keys)


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    batch, _, n_queries = q.shape
    d_v, n_keys = v.shape[1], v.shape[2]
    acc = accumulation_dtype(q.dtype)
    k_acc, v_acc = k.to(acc), v.to(acc)
    out = torch.empty(batch, d_v, n_queries, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, n_queries, dtype=acc, device=q.device)
    rows = _rows_per_chunk(batch, n_keys, n_queries, acc)
    storage = torch.empty(batch * rows * n_keys, dtype=acc, device=q.device)
    for start, stop in _chunks(n_queries, rows):
        p = _buffer(storage, batch, stop - start, n_keys)
        torch.bmm(q[:, :, start:stop].transpose(1, 2).to(acc), k_acc, out=p)
        if scale != 1.0:
            p.mul_(scale)
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
    return out, lse


def _backward(q, k, v, out, lse, grad_out, grad_lse, scale, needs):
    """Gradients (dq, dk, dv) with probabilities recomputed per query chunk from `lse`."""
    batch, d_qk, n_queries = q.shape
    n_keys = k.shape[2]
    acc = lse.dtype
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
        p = _buffer(storage_p, batch, stop - start, n_keys)
        torch.bmm(q_chunk.transpose(1, 2), k_acc, out=p)
        if scale != 1.0:
            p.mul_(scale)
        p.sub_(lse[:, start:stop, None]).exp_()
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


def _differentiable(q, k, v, scale):
    """(out, lse) by chunked differentiable ops: used for double backward only."""
    acc = accumulation_dtype(q.dtype)
    k_acc, v_acc = k.to(acc), v.to(acc)
    rows = _rows_per_chunk(q.shape[0], k.shape[2], q.shape[2], acc)
    outs, lses = [], []
    for start, stop in _chunks(q.shape[2], rows):
        logits = torch.bmm(q[:, :, start:stop].transpose(1, 2).to(acc), k_acc) * scale
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.bmm(v_acc, torch.exp(logits - lse[..., None]).transpose(1, 2)))
        lses.append(lse)
    if not outs:  # N == 0
        return q.new_zeros(q.shape[0], v.shape[1], 0), q.new_zeros(q.shape[0], 0, dtype=acc)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=1)


def _no_autocast(device: torch.device):
    """Autocast would push the fp32 accumulation bmms down to fp16/bf16: the op picks its own
    precision (fp32 statistics and accumulators), so autocast is off inside it."""
    return torch.autocast(device.type, enabled=False)


def differentiable_grads(q, k, v, grad_out, grad_lse, scale, needs):
    """(dq, dk, dv) with a graph, for create_graph=True (double backward, gradient penalties).

    Recomputes (out, lse) from q, k, v with differentiable chunked ops and differentiates them,
    so second derivatives follow. Also used by the Triton backend's backward under create_graph.
    """
    inputs = [t for t, need in zip((q, k, v), needs) if need]
    out, lse = _differentiable(q, k, v, scale)
    outputs, grads = [out], [grad_out]
    if grad_lse is not None:
        outputs.append(lse)
        grads.append(grad_lse.to(lse.dtype))
    got = iter(torch.autograd.grad(outputs, inputs, grads, create_graph=True, allow_unused=True))
    return tuple(next(got) if need else None for need in needs)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        with _no_autocast(q.device):
            out, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        with _no_autocast(q.device):
            return _ChunkedAttention._backward(ctx, q, k, v, out, lse, grad_out, grad_lse, needs)

    @staticmethod
    def _backward(ctx, q, k, v, out, lse, grad_out, grad_lse, needs):
        if torch.is_grad_enabled():
            def first_order(grad_out, grad_lse):
                return _backward(q, k, v, out, lse, grad_out, grad_lse, ctx.scale, needs)
            return first_order_grads(first_order, q, k, v, out, grad_out, grad_lse, ctx.scale, needs) + (None,)
        return _backward(q, k, v, out, lse, grad_out, grad_lse, ctx.scale, needs) + (None,)


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
