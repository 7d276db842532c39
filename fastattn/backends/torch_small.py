"""The torch backend's strategy for small problems: keep the probabilities.

When the (B, N, M) probability matrix fits in constants.TORCH_KEEP_PROBS_BYTES (a few MiB, fixed,
never proportional to N x M beyond it), recomputing it in the backward costs more than keeping
it: at such sizes each op is microseconds and the chunked path's extra logits matmul, exp pass
and per-chunk Python are what a step spends. This path computes the logits once, takes torch's
fused softmax, saves the probabilities for the backward and differentiates them with the fused
softmax backward: the naive layer's arithmetic, as one autograd node, in fp32 accumulation.
An inference forward (no graph) of such a size is the same three ops with the softmax in place on
the logits: one (B, N, M) buffer where the naive layer allocates two. A training forward of at most
TORCH_PLAIN_AUTOGRAD_BYTES (a CIFAR-sized call) skips the Function's Python backward and runs torch's
own autograd of the three ops in token-major layout (plain_autograd_out), whose softmax backward
gets a contiguous gradient where the naive layer's gets a transposed one.

Everything larger goes to the chunked path (torch_chunked.py), whose working memory is bounded.
Double backward (create_graph) goes to chunked_grad.FirstOrderGrads (chunked recomputation).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .. import constants
from ..reference import accumulation_dtype
from .chunked_grad import attention_backward, no_autocast
from .torch_chunked import TorchChunkedBackend, chunked_attention, chunked_out, matrix_bytes

__all__ = ["TorchBackend", "keeps_probabilities", "kept_probs_attention", "kept_probs_out",
           "plain_autograd_fits", "plain_autograd_out"]


def keeps_probabilities(batch: int, n_queries: int, n_keys: int, acc: torch.dtype) -> bool:
    """Whether this problem takes the kept-probabilities path: its (B, N, M) matrix in the
    accumulation dtype fits in TORCH_KEEP_PROBS_BYTES, or each sample's matrix is at most
    TORCH_KEEP_PROBS_SMALL_SAMPLE_BYTES and the whole at most TORCH_KEEP_PROBS_SMALL_SAMPLE_MAX_BYTES
    (a fixed cap either way: never proportional to N x M beyond it)."""
    per_sample, total = matrix_bytes(batch, n_queries, n_keys, acc)
    if total <= constants.TORCH_KEEP_PROBS_BYTES:
        return True
    return (per_sample <= constants.TORCH_KEEP_PROBS_SMALL_SAMPLE_BYTES
            and total <= constants.TORCH_KEEP_PROBS_SMALL_SAMPLE_MAX_BYTES)


def plain_autograd_fits(batch: int, n_queries: int, n_keys: int, acc: torch.dtype) -> bool:
    """Whether a training forward (graph, no return_lse) of this size runs torch's own autograd
    (plain_autograd_out) rather than the kept-probabilities Function: the whole (B, N, M) matrix
    within TORCH_PLAIN_AUTOGRAD_BYTES and each sample's within TORCH_PLAIN_AUTOGRAD_SAMPLE_BYTES."""
    per_sample, total = matrix_bytes(batch, n_queries, n_keys, acc)
    return total <= constants.TORCH_PLAIN_AUTOGRAD_BYTES and per_sample <= constants.TORCH_PLAIN_AUTOGRAD_SAMPLE_BYTES


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to() still costs ~1 us of dispatch


def _logits(q: Tensor, k: Tensor, scale: float, acc: torch.dtype) -> Tensor:
    logits = torch.bmm(_to(q.transpose(1, 2), acc), _to(k, acc))
    if scale != 1.0:
        logits.mul_(scale)
    return logits


def _kept_probs_out_acc(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """out alone, no graph (inference forward without return_lse), for inputs in their
    accumulation dtype (fp32, fp64): three fused ops, the softmax in place on the logits (one
    (B, N, M) buffer, where the naive layer allocates two)."""
    p = torch.bmm(q.mT, k)
    if scale != 1.0:
        p.mul_(scale)
    torch._softmax(p, -1, False, out=p)
    return torch.bmm(v, p.mT)


def kept_probs_out(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """_kept_probs_out_acc for inputs of any dtype: fp16/bf16 are lifted to fp32 for it (the dtype
    checks are a measurable share of a 0.1 ms call, so fp32/fp64 inputs skip this wrapper)."""
    acc = accumulation_dtype(q.dtype)
    return _to(_kept_probs_out_acc(_to(q, acc), _to(k, acc), _to(v, acc), scale), q.dtype)


def _autocast_may_be_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # an older torch, or a device type autocast does not know
        return True


def plain_autograd_out(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """out through torch's own autograd of bmm -> softmax -> bmm (inputs already in their
    accumulation dtype, autocast off, which would lower them), token-major: the logits are built
    transposed, (B, M, N) = k^T q, and the softmax runs over dim 1, so out = v @ P^T is v @ that
    matrix with no transposed view anywhere. The naive layer's softmax backward receives a
    transposed (non-contiguous) gradient and runs slower than this layout's; the arithmetic is the
    same up to fp32 rounding. What it saves for the backward is the probabilities (the logits are
    freed), and where it is chosen (plain_autograd_fits) its C++ backward beats the Python
    autograd.Function's fixed cost."""
    logits = torch.bmm(k.mT, q)
    if scale != 1.0:
        logits = logits * scale
    return torch.bmm(v, torch.softmax(logits, dim=1))


class _KeptProbsAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, need_lse):
        with no_autocast(q.device):
            acc = accumulation_dtype(q.dtype)
            p = _logits(q, k, scale, acc)
            # the log-sum-exp is one more pass over the (B, N, M) logits: only when asked for
            lse = torch.logsumexp(p, dim=-1) if need_lse else p.new_empty(0)
            torch._softmax(p, -1, False, out=p)  # in place: the logits are not needed again
            out = torch.bmm(v.to(acc), p.transpose(1, 2)).to(q.dtype)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, p = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_lse is not None and grad_lse.numel() == 0:  # lse was not computed (need_lse=False)
            grad_lse = None
        if grad_out is None and torch.is_grad_enabled():  # create_graph: FirstOrderGrads wants a tensor
            grad_out = q.new_zeros(q.shape[0], v.shape[1], q.shape[2])

        def first_order(grad_out, grad_lse):
            return _backward(q, k, v, p, grad_out, grad_lse, ctx.scale, needs)
        return attention_backward(first_order, q, k, v, None, grad_out, grad_lse, ctx.scale, needs) + (None, None)


def _backward(q, k, v, p, grad_out, grad_lse, scale, needs):
    acc = p.dtype
    dq = dk = dv = None
    if grad_out is not None:
        grad_out = grad_out.to(acc)
        if needs[2]:
            dv = torch.bmm(grad_out, p).to(v.dtype)  # (B, d_v, M)
    if not (needs[0] or needs[1]):
        return dq, dk, dv
    if grad_out is not None:
        dp = torch.bmm(grad_out.transpose(1, 2), v.to(acc))  # (B, N, M)
        ds = torch._softmax_backward_data(dp, p, -1, acc)
        del dp
    else:
        ds = torch.zeros_like(p)
    if grad_lse is not None:  # d lse_i / d logit_ij = p_ij
        ds.addcmul_(p, grad_lse.to(acc)[:, :, None])
    if scale != 1.0:
        ds.mul_(scale)
    if needs[0]:
        dq = torch.bmm(k.to(acc), ds.transpose(1, 2)).to(q.dtype)  # (B, d_qk, N)
    if needs[1]:
        dk = torch.bmm(q.to(acc), ds).to(k.dtype)  # (B, d_qk, M)
    return dq, dk, dv


def kept_probs_attention(q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0,
                         need_lse: bool = True) -> tuple[Tensor, Tensor]:
    """(out, lse), differentiable, probabilities kept for the backward (small problems only).
    need_lse=False leaves lse empty (and saves its pass over the logits)."""
    return _KeptProbsAttention.apply(q, k, v, float(scale), need_lse)


def _runner(train, infer):
    """out(q, k, v): train where a graph is needed (grad mode on and an input requires grad),
    infer otherwise."""
    def run(q, k, v):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return train(q, k, v)
        return infer(q, k, v)
    return run


class TorchBackend(TorchChunkedBackend):
    """The `torch` backend: per problem size, kept probabilities (small) or blocks recomputed in
    the backward (everything else), and no graph at all for an inference forward."""

    def attention(self, q, k, v, scale):
        if keeps_probabilities(q.shape[0], q.shape[2], k.shape[2], accumulation_dtype(q.dtype)):
            return kept_probs_attention(q, k, v, scale)
        return chunked_attention(q, k, v, scale)

    def attention_out(self, q, k, v, scale):
        return self.out_runner(q, k, v, scale)(q, k, v)

    def out_runner(self, q, k, v, scale):
        """The strategy for this signature, decided once. Where the (B, N, M) matrix fits the
        kept-probabilities budget (keeps_probabilities), an inference forward (no graph) is three
        whole ops and a training forward keeps the probabilities (torch's own autograd in token-
        major layout where plain_autograd_fits, unless autocast may be on); elsewhere both run in
        blocks."""
        acc = accumulation_dtype(q.dtype)
        batch, n_queries, n_keys = q.shape[0], q.shape[2], k.shape[2]
        if not keeps_probabilities(batch, n_queries, n_keys, acc):
            return _runner(lambda q, k, v: chunked_attention(q, k, v, scale, need_lse=False)[0],
                           lambda q, k, v: chunked_out(q, k, v, scale))
        def kept(q, k, v):
            return kept_probs_attention(q, k, v, scale, need_lse=False)[0]
        if acc != q.dtype:  # fp16/bf16: lifted to fp32 for the ops
            return _runner(kept, lambda q, k, v: kept_probs_out(q, k, v, scale))
        infer = partial(_kept_probs_out_acc, scale=scale)  # no Python frame of its own
        if not plain_autograd_fits(batch, n_queries, n_keys, acc):
            return _runner(kept, infer)
        device_type = q.device.type

        def train(q, k, v):
            if _autocast_may_be_on(device_type):  # autocast would lower torch's own bmm
                return kept(q, k, v)
            return plain_autograd_out(q, k, v, scale)
        return _runner(train, infer)
