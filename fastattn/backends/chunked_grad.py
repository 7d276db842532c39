"""Memory-efficient double backward of spatial attention (R1 / R2 / WGAN-GP penalties).

The first backward, (q, k, v, dO, dlse) -> (dq, dk, dv), is its own autograd.Function,
`FirstOrderGrads`. Its forward is a backend's own first-order backward (the torch backend's
chunked one, or the Triton kernels); its backward recomputes the probabilities query chunk by
query chunk and forms the second-order terms in the same chunks. A chunk holds whole rows, so
it computes their softmax from scratch (row max, exp, row sum): it needs none of the forward's
saved statistics, and the largest probability of a row is exactly exp(0) as in the naive
softmax (no lse rounding, which hurts with unscaled GAN logits of 1e4).
It saves q, k, v, O (when the backend has it), dO and dlse only: O(B (N + M) d), never an N x M tensor, and four
(B, chunk, M) buffers live at a time (constants.DOUBLE_BACKWARD_CHUNK_BYTES each).

Math, per batch, with channel-major q (d_qk, N), k (d_qk, M), v (d_v, M), dO (d_v, N) and
  P = softmax_rows(scale q^T k),  dP = dO^T v,  delta_i = sum_j P_ij dP_ij - dlse_i,
  dS = P * (dP - delta),  dq = scale k dS^T,  dk = scale q dS,  dv = dO P.
Given the upstream gradients gq, gk, gv of (dq, dk, dv):
  C  = scale (gq^T k + q^T gk),  c_i = sum_j P_ij C_ij,  G = P * (C - c)
  H  = dO^T gv + (dP - delta) * (C - c),  E = P * (H - rowsum(P * H))
  grad q    = scale (k E^T + gk dS^T)        (query side: local to the chunk)
  grad k    = scale (q E + gq dS)            (key side: summed over chunks)
  grad v    = dO G                           (key side)
  grad dO   = v G^T + gv P^T                 (query side)
  grad dlse = c                              (query side)
(H drops a per-row constant, -delta_i c_i, which softmax's backward removes anyway.)
delta is rowsum(dO * O) - dlse, from the saved output, as in the first-order backward (or, for
a backend without a saved output, rowsum(P * dP) - dlse in the chunk).
Accumulation is in fp32 (fp64 for fp64).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import constants
from ..reference import accumulation_dtype

__all__ = ["FirstOrderGrads", "attention_backward", "first_order_grads", "second_order_grads"]

# first_order(grad_out, grad_lse) -> (dq, dk, dv): a backend's own non-differentiable backward
# (closing over its saved statistics); entries whose `needs` is False may be None.
FirstOrder = Callable[..., tuple]


def _rows_per_chunk(batch: int, n_keys: int, n_queries: int, acc: torch.dtype) -> int:
    """Query rows per chunk so that one (B, rows, M) buffer takes DOUBLE_BACKWARD_CHUNK_BYTES."""
    per_row = max(1, batch * n_keys * torch.empty((), dtype=acc).element_size())
    return max(1, min(n_queries, constants.DOUBLE_BACKWARD_CHUNK_BYTES // per_row))


def _t(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


def second_order_grads(q, k, v, out, grad_out, grad_lse, scale, g_dq, g_dk, g_dv, needs):
    """Gradients of <g_dq, dq> + <g_dk, dk> + <g_dv, dv> with respect to
    (q, k, v, grad_out, grad_lse), for the `needs` that are True; None elsewhere.
    Any of g_dq, g_dk, g_dv may be None (zero). Four (B, chunk, M) buffers, reused across chunks;
    every multiplication by `scale` is applied to the O((N + M) d) operands, not to the buffers."""
    need_q, need_k, need_v, need_do, need_dlse = needs
    batch, d_qk, n_queries = q.shape
    d_v, n_keys = v.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    dev = q.device
    k_acc, v_acc = k.to(acc), v.to(acc)
    k_scaled = k_acc * scale
    # delta_i = sum_c dO[c, i] O[c, i] - dlse_i, as the first-order backward computes it; without
    # a saved output, sum_j P_ij dP_ij - dlse_i per chunk (the same value: O = V P^T)
    neg_delta = None
    if out is not None:
        neg_delta = -(grad_out.to(acc) * out.to(acc)).sum(dim=1)
        if grad_lse is not None:
            neg_delta += grad_lse.to(acc)
    g_dk = g_dk.to(acc) if g_dk is not None else None
    g_dv = g_dv.to(acc) if g_dv is not None else None
    has_c = g_dq is not None or g_dk is not None  # C = 0 without gradients on dq and dk
    # C = [gq; q]^T [scale k; scale gk]: one bmm over 2 d_qk channels (d_qk when one is absent)
    c_keys = [k_scaled] if g_dq is not None else []
    if g_dk is not None:
        c_keys.append(g_dk * scale)
    c_keys = torch.cat(c_keys, dim=1) if has_c else None
    grad_q = torch.empty(batch, d_qk, n_queries, dtype=acc, device=dev) if need_q else None
    grad_k = torch.zeros(batch, d_qk, n_keys, dtype=acc, device=dev) if need_k else None
    grad_v = torch.zeros(batch, d_v, n_keys, dtype=acc, device=dev) if need_v else None
    grad_do = torch.zeros(batch, d_v, n_queries, dtype=acc, device=dev) if need_do else None
    grad_dlse = (torch.zeros(batch, n_queries, dtype=acc, device=dev)
                 if need_dlse and grad_lse is not None else None)
    need_e = need_q or need_k  # E: the gradient of the logits
    rows = _rows_per_chunk(batch, n_keys, n_queries, acc)
    size = batch * rows * n_keys
    storage = torch.empty(4 * size, dtype=acc, device=dev)

    def buffer(i, r):
        return storage[i * size: i * size + batch * r * n_keys].view(batch, r, n_keys)

    for start in range(0, n_queries, rows):
        stop = min(n_queries, start + rows)
        r = stop - start
        q_c = q[:, :, start:stop].to(acc)
        do_c = grad_out[:, :, start:stop].to(acc)
        gq_c = g_dq[:, :, start:stop].to(acc) if g_dq is not None else None
        p, dpm, cc, aux = (buffer(i, r) for i in range(4))
        # P from scratch: each chunk holds whole rows, so their max and sum need no saved statistics
        torch.baddbmm(p, _t(q_c), k_acc, beta=0.0, alpha=scale, out=p)
        p.sub_(p.amax(dim=-1, keepdim=True)).exp_()
        p.div_(p.sum(dim=-1, keepdim=True))
        if neg_delta is not None:
            torch.baddbmm(neg_delta[:, start:stop, None], _t(do_c), v_acc, out=dpm)  # dP - delta
        else:
            torch.bmm(_t(do_c), v_acc, out=dpm)
            delta = torch.linalg.vecdot(p, dpm)
            if grad_lse is not None:
                delta -= grad_lse[:, start:stop].to(acc)
            dpm.sub_(delta[..., None])  # dP - delta
        if has_c:
            c_queries = [gq_c] if gq_c is not None else []
            if g_dk is not None:
                c_queries.append(q_c)
            c_queries = torch.cat(c_queries, dim=1)
            torch.bmm(_t(c_queries), c_keys, out=cc)
            c = torch.linalg.vecdot(p, cc)  # (B, chunk)
            if grad_dlse is not None:
                grad_dlse[:, start:stop] = c
            cc.sub_(c[..., None])  # C - c
            if need_v or need_do:
                g = torch.mul(p, cc, out=aux)
                if grad_v is not None:
                    grad_v.baddbmm_(do_c, g)
                if need_do:
                    torch.bmm(v_acc, _t(g), out=grad_do[:, :, start:stop])
        if need_do and g_dv is not None:
            grad_do[:, :, start:stop].baddbmm_(g_dv, _t(p))
        if not need_e:
            continue
        ds = torch.mul(p, dpm, out=aux) if has_c else None
        # H = dO^T gv + (dP - delta) (C - c), then E = P (H - rowsum(P H)), in dpm's buffer
        if has_c:
            h = dpm.mul_(cc)
            if g_dv is not None:
                h.baddbmm_(_t(do_c), g_dv)
        elif g_dv is not None:
            h = torch.bmm(_t(do_c), g_dv, out=dpm)
        else:
            h = dpm.zero_()
        e = h.sub_(torch.linalg.vecdot(p, h)[..., None]).mul_(p)
        if grad_q is not None:
            gq = torch.bmm(k_scaled, _t(e))
            if ds is not None and g_dk is not None:
                gq.baddbmm_(g_dk, _t(ds), alpha=scale)
            grad_q[:, :, start:stop] = gq
        if grad_k is not None:
            grad_k.baddbmm_(q_c, e, alpha=scale)
            if ds is not None and gq_c is not None:
                grad_k.baddbmm_(gq_c, ds, alpha=scale)
    return (
        grad_q.to(q.dtype) if grad_q is not None else None,
        grad_k.to(k.dtype) if grad_k is not None else None,
        grad_v.to(v.dtype) if grad_v is not None else None,
        grad_do.to(grad_out.dtype) if grad_do is not None else None,
        grad_dlse.to(grad_lse.dtype) if grad_dlse is not None else None,
    )


def no_autocast(device: torch.device):
    """Autocast would push the fp32 accumulation bmms down to fp16/bf16: each backend op picks
    its own precision (fp32 statistics and accumulators), so autocast is off inside it."""
    return torch.autocast(device.type, enabled=False)


class FirstOrderGrads(torch.autograd.Function):
    """(dq, dk, dv) of attention as a differentiable function of (q, k, v, grad_out, grad_lse)."""

    @staticmethod
    def forward(ctx, first_order, q, k, v, out, grad_out, grad_lse, scale, needs):
        with no_autocast(q.device):
            grads = first_order(grad_out, grad_lse)
        ctx.save_for_backward(q, k, v, out, grad_out, grad_lse)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return tuple(g if need else None for g, need in zip(grads, needs))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_dq, g_dk, g_dv):
        q, k, v, out, grad_out, grad_lse = ctx.saved_tensors
        needs = (*ctx.needs_input_grad[1:4], *ctx.needs_input_grad[5:7])
        with no_autocast(q.device):
            grads = second_order_grads(q, k, v, out, grad_out, grad_lse, ctx.scale, g_dq, g_dk, g_dv, needs)
        grad_q, grad_k, grad_v, grad_do, grad_dlse = grads
        return None, grad_q, grad_k, grad_v, None, grad_do, grad_dlse, None, None


def first_order_grads(first_order: FirstOrder, q: Tensor, k: Tensor, v: Tensor, out: Optional[Tensor],
                      grad_out: Tensor, grad_lse: Optional[Tensor], scale: float, needs) -> tuple:
    """(dq, dk, dv) with a graph whose backward never holds more than a chunk of probabilities:
    for create_graph=True (double backward). `first_order(grad_out, grad_lse)` computes the
    values with the backend's own backward (from whatever statistics its forward saved); `out` is
    the forward's output (no gradient flows to it; delta = rowsum(grad_out * out) - grad_lse), or
    None for a backend that does not save it (delta is then recomputed from the probabilities)."""
    needs = tuple(bool(n) for n in needs)
    out = out.detach() if out is not None else None
    return FirstOrderGrads.apply(first_order, q, k, v, out, grad_out, grad_lse, float(scale), needs)


def attention_backward(first_order: FirstOrder, q: Tensor, k: Tensor, v: Tensor, out: Optional[Tensor],
                       grad_out: Optional[Tensor], grad_lse: Optional[Tensor], scale: float, needs) -> tuple:
    """The backward of a backend's attention autograd.Function: first_order(grad_out, grad_lse)
    with autocast off (the op picks its own precision), or, under create_graph=True, the same
    values as FirstOrderGrads, differentiable without an N x M tensor (see first_order_grads)."""
    if torch.is_grad_enabled():
        return first_order_grads(first_order, q, k, v, out, grad_out, grad_lse, scale, needs)
    with no_autocast(q.device):
        return first_order(grad_out, grad_lse)
