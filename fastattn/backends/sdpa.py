"""PyTorch's own fused CPU attention kernel (the flash path of scaled_dot_product_attention) as a
fastattn backend, for the shapes where it is the faster engine.

It runs the kernel on token-major contiguous copies of the channel-major inputs and, like the torch
backend, returns (out, lse): the kernel computes the exact per-query log-sum-exp itself. The
backward uses the kernel's own backward; a gradient flowing into lse (return_lse=True and a loss
on it) takes the torch backend's exact backward instead, and double backward (create_graph,
gradient penalties) goes to chunked_grad.FirstOrderGrads, so the semantics are those of every
other backend.

Capabilities (`unsupported`): CPU tensors, d_qk == d_v (the kernel's one head width), and a torch
that has the kernel. Automatic choice (`not_automatic`) takes it only where it was measured
faster than the torch backend: d_qk = d_v >= constants.SDPA_AUTO_MIN_HEAD_DIM and at least
constants.SDPA_AUTO_MIN_PAIRS (query, key) pairs per sample. A user who names
another backend never gets this one, and a user who names this one gets it or the reasons.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import constants
from ..dispatch import Backend
from .chunked_grad import attention_backward, no_autocast
from .torch_chunked import chunked_backward

__all__ = ["SdpaBackend", "sdpa_attention"]

_OPS = torch.ops.aten


def _kernel_missing() -> list[str]:
    needed = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
    missing = [name for name in needed if not hasattr(_OPS, name)]
    return [f"this torch ({torch.__version__}) has no aten.{name}" for name in missing]


def _token_major(t: Tensor) -> Tensor:
    """(B, d, L) -> (B, 1, L, d), one head, contiguous: the kernel reads the channel-major views
    ~7-10x slower than a copy (measured, 1 thread: d=512, N=M=4096 forward 23.9 s on views vs 1.9 s
    on copies), and the copy costs O((N + M) d), not O(N M)."""
    return t.transpose(1, 2).unsqueeze(1).contiguous()


def _channel_major(t: Tensor) -> Tensor:
    return t.squeeze(1).transpose(1, 2)


class _SdpaAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q_t, k_t, v_t = _token_major(q), _token_major(k), _token_major(v)
        with no_autocast(q.device):
            out_t, lse = _OPS._scaled_dot_product_flash_attention_for_cpu(q_t, k_t, v_t, 0.0, False, scale=scale)
        lse = lse.squeeze(1)
        # the token-major copies are what the kernel's backward reads: saved, so that the backward
        # does not transpose q, k, v and out again (four strided copies of O(N d) each); q, k, v
        # themselves (no copies) are what a double backward differentiates through
        ctx.save_for_backward(q, k, v, q_t, k_t, v_t, out_t, lse)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # an unused lse gets no gradient: the kernel's backward
        return _channel_major(out_t), lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, q_t, k_t, v_t, out_t, lse = ctx.saved_tensors
        out = _channel_major(out_t)
        needs = ctx.needs_input_grad[:3]
        if grad_out is None:
            grad_out = torch.zeros_like(out)

        def first_order(grad_out, grad_lse):
            if grad_lse is not None:
                # the kernel's backward has no lse term: the torch backend's backward has (it
                # recomputes the probabilities from the logits, needing no statistics)
                return chunked_backward(q, k, v, out, grad_out, grad_lse, ctx.scale, needs)
            dq, dk, dv = _OPS._scaled_dot_product_flash_attention_for_cpu_backward(
                _token_major(grad_out), q_t, k_t, v_t, out_t, lse.unsqueeze(1), 0.0, False, scale=ctx.scale)
            return tuple(_channel_major(g) if need else None for g, need in zip((dq, dk, dv), needs))

        return attention_backward(first_order, q, k, v, out, grad_out, grad_lse, ctx.scale, needs) + (None,)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(out, lse) by PyTorch's fused CPU kernel; lse in fp32 (fp64 for fp64 inputs)."""
    return _SdpaAttention.apply(q, k, v, float(scale))


class SdpaBackend(Backend):
    name = "sdpa"
    # above torch (10): where both can run and automatic choice allows it, this was measured faster
    priority = 20

    def unavailable(self):
        return _kernel_missing()

    def unsupported(self, q, k, v):
        reasons = []
        if q.device.type != "cpu":
            reasons.append(f"runs PyTorch's CPU flash kernel; the inputs are on {q.device.type}")
        if q.shape[1] != v.shape[1]:
            reasons.append(f"needs d_qk == d_v (one head width), got d_qk={q.shape[1]}, d_v={v.shape[1]}")
        return reasons

    def not_automatic(self, q, k, v):
        d, pairs = q.shape[1], q.shape[2] * k.shape[2]
        reasons = []
        if d < constants.SDPA_AUTO_MIN_HEAD_DIM:
            reasons.append(f"d_qk = d_v = {d} is below SDPA_AUTO_MIN_HEAD_DIM = {constants.SDPA_AUTO_MIN_HEAD_DIM}, "
                           "where the torch backend was measured faster")
        if pairs < constants.SDPA_AUTO_MIN_PAIRS:
            reasons.append(f"N x M = {pairs} (query, key) pairs is below SDPA_AUTO_MIN_PAIRS = "
                           f"{constants.SDPA_AUTO_MIN_PAIRS}, where the torch backend was measured faster")
        return reasons

    def attention(self, q, k, v, scale):
        return sdpa_attention(q, k, v, scale)
