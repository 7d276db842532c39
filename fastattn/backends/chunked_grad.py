"""Memory-efficient double backward of spatial attention (R1 / R2 / WGAN-GP penalties).

The first backward, (q, k, v, dO, dlse) -> (dq, dk, dv), is its own autograd.Function,
`FirstOrderGrads`. Its forward is a backend's own first-order backward (the torch backend's
chunked one, or the Triton kernels); its backward recomputes the probabilities query chunk by
query chunk from the per-query log-sum-exp and forms the second-order terms in the same chunks.
It saves q, k, v, dO, dlse and lse only: O(B (N + M) d), never an N x M tensor, and at most a
handful of (B, chunk, M) buffers live at a time (constants.DOUBLE_BACKWARD_BUFFERS of them).

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
delta is recomputed from P rather than read from the saved output, so no output is needed and
the derivative is that of exactly what is computed. Accumulation is in fp32 (fp64 for fp64).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import constants
from ..reference import accumulation_dtype

__all__ = ["FirstOrderGrads", "first_order_grads", "second_order_grads"]

# first_order(q, k, v, out, lse, grad_out, grad_lse, scale, needs) -> (dq, dk, dv): a backend's
# own non-differentiable backward; entries whose `needs` is False may be None.
FirstOrder = Callable[..., tuple]


def _rows_per_chunk(batch: int, n_keys: int, n_queries: int, acc: torch.dtype) -> int:
    """Query rows per chunk so that one (B, rows, M) buffer takes TORCH_CHUNK_BYTES."""
    per_row = max(1, batch * n_keys * torch.empty((), dtype=acc).element_size())
    return max(1, min(n_queries, constants.TORCH_CHUNK_BYTES // per_row))


def _bmm_t(a: Tensor, b: Tensor) -> Tensor:
    """a^T b for channel-major a (B, d, c), b (B, d, M) -> (B, c, M)."""
    return torch.bmm(a.transpose(1, 2), b)


def second_order_grads(q, k, v, grad_out, grad_lse, lse, scale, g_dq, g_dk, g_dv, needs):
    """Gradients of <g_dq, dq> + <g_dk, dk> + <g_dv, dv> with respect to
    (q, k, v, grad_out, grad_lse), for the `needs` that are True; None elsewhere.
    Any of g_dq, g_dk, g_dv may be None (zero)."""
    need_q, need_k, need_v, need_do, need_dlse = needs
    batch, d_qk, n_queries = q.shape
    n_keys = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    k_acc, v_acc, lse = k.to(acc), v.to(acc), lse.to(acc)
    g_dk = g_dk.to(acc) if g_dk is not None else None
    g_dv = g_dv.to(acc) if g_dv is not None else None
    has_c = g_dq is not None or g_dk is not None  # C = 0 without gradients on dq and dk
    grad_q = torch.empty(batch, d_qk, n_queries, dtype=acc, device=q.device) if need_q else None
    grad_k = torch.zeros(batch, d_qk, n_keys, dtype=acc, device=q.device) if need_k else None
    grad_v = torch.zeros(batch, v.shape[1], n_keys, dtype=acc, device=q.device) if need_v and has_c else None
    grad_do = torch.empty(batch, v.shape[1], n_queries, dtype=acc, device=q.device) if need_do else None
    grad_dlse = (torch.zeros(batch, n_queries, dtype=acc, device=q.device)
                 if need_dlse and grad_lse is not None else None)
    need_e = need_q or need_k  # E: the gradient of the logits
    rows = _rows_per_chunk(batch, n_keys, n_queries, acc)
    for start in range(0, n_queries, rows):
        stop = min(n_queries, start + rows)
        q_c = q[:, :, start:stop].to(acc)
        do_c = grad_out[:, :, start:stop].to(acc)
        gq_c = g_dq[:, :, start:stop].to(acc) if g_dq is not None else None
        p = _bmm_t(q_c, k_acc)
        if scale != 1.0:
            p.mul_(scale)
        p.sub_(lse[:, start:stop, None]).exp_()
        # dP - delta, delta recomputed from P (and dlse)
        dpm = _bmm_t(do_c, v_acc)
        delta = torch.linalg.vecdot(p, dpm)
        if grad_lse is not None:
            delta = delta - grad_lse[:, start:stop].to(acc)
        dpm.sub_(delta[..., None])
        ds = p * dpm if (has_c and need_e) else None
        cc = None
        if has_c:
            cc = _bmm_t(gq_c, k_acc) if gq_c is not None else None
            if g_dk is not None:
                cc = _bmm_t(q_c, g_dk) if cc is None else cc.baddbmm_(q_c.transpose(1, 2), g_dk)
            if scale != 1.0:
                cc.mul_(scale)
            c = torch.linalg.vecdot(p, cc)  # (B, chunk)
            if grad_dlse is not None:
                grad_dlse[:, start:stop] = c
            cc.sub_(c[..., None])  # C - c
            if need_v or need_do:
                g = p * cc
                if grad_v is not None:
                    grad_v.baddbmm_(do_c, g)
                if need_do:
                    grad_do[:, :, start:stop] = torch.bmm(v_acc, g.transpose(1, 2))
                del g
        if need_do and g_dv is not None:
            if has_c:
                grad_do[:, :, start:stop].baddbmm_(g_dv, p.transpose(1, 2))
            else:
                grad_do[:, :, start:stop] = torch.bmm(g_dv, p.transpose(1, 2))
        elif need_do and not has_c:
            grad_do[:, :, start:stop] = 0
        if not need_e:
            continue
        # H = dO^T gv + (dP - delta) (C - c), then E = P (H - rowsum(P H)), built in dpm's buffer
        if has_c:
            h = dpm.mul_(cc)
            if g_dv is not None:
                h.baddbmm_(do_c.transpose(1, 2), g_dv)
        elif g_dv is not None:
            h = torch.bmm(do_c.transpose(1, 2), g_dv, out=dpm)
        else:
            h = dpm.zero_()
        del cc
        e = h.sub_(torch.linalg.vecdot(p, h)[..., None]).mul_(p)
        if scale != 1.0:
            e.mul_(scale)
            if ds is not None:
                ds.mul_(scale)
        if grad_q is not None:
            gq = torch.bmm(k_acc, e.transpose(1, 2))
            if ds is not None and g_dk is not None:
                gq.baddbmm_(g_dk, ds.transpose(1, 2))
            grad_q[:, :, start:stop] = gq
        if grad_k is not None:
            grad_k.baddbmm_(q_c, e)
            if ds is not None and gq_c is not None:
                grad_k.baddbmm_(gq_c, ds)
    if need_v and grad_v is None:
        grad_v = torch.zeros(batch, v.shape[1], n_keys, dtype=acc, device=q.device)
    return (
        grad_q.to(q.dtype) if grad_q is not None else None,
        grad_k.to(k.dtype) if grad_k is not None else None,
        grad_v.to(v.dtype) if grad_v is not None else None,
        grad_do.to(grad_out.dtype) if grad_do is not None else None,
        grad_dlse.to(grad_lse.dtype) if grad_dlse is not None else None,
    )


class FirstOrderGrads(torch.autograd.Function):
    """(dq, dk, dv) of attention as a differentiable function of (q, k, v, grad_out, grad_lse)."""

    @staticmethod
    def forward(ctx, first_order, q, k, v, grad_out, grad_lse, out, lse, scale, needs):
        with torch.autocast(q.device.type, enabled=False):
            grads = first_order(q, k, v, out, lse, grad_out, grad_lse, scale, needs)
        ctx.save_for_backward(q, k, v, grad_out, grad_lse, lse)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return tuple(g if need else None for g, need in zip(grads, needs))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_dq, g_dk, g_dv):
        q, k, v, grad_out, grad_lse, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[1:6])
        with torch.autocast(q.device.type, enabled=False):
            grads = second_order_grads(q, k, v, grad_out, grad_lse, lse, ctx.scale, g_dq, g_dk, g_dv, needs)
        return (None, *grads, None, None, None, None)


def first_order_grads(first_order: FirstOrder, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      grad_out: Tensor, grad_lse: Optional[Tensor], scale: float, needs) -> tuple:
    """(dq, dk, dv) with a graph whose backward never holds more than a chunk of probabilities:
    for create_graph=True (double backward). `first_order` computes the values (the backend's
    own backward); `out` and `lse` are the forward's saved results (no gradient flows to them)."""
    needs = tuple(bool(n) for n in needs)
    return FirstOrderGrads.apply(first_order, q, k, v, grad_out, grad_lse, out.detach(), lse.detach(),
                                 float(scale), needs)
