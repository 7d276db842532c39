"""Backward kernels: delta, then dK/dV (and optionally dQ), then (two-pass) dQ.

Probabilities are recomputed from q, k and the forward's row max m and row sum l (`stats`):
p = exp2((s - m) * log2 e) / l, with s recomputed by the forward's arithmetic, so the largest p
of a row is exactly 1 / l as in the naive softmax (recomputing from the lse instead carried its
|lse| * 2^-24 rounding into every p: 5-1600x the naive path's fp32 dv error at |s| 400-3e4).
For fp32 inputs the dK/dV kernel computes the logits tile as the forward does, q rows times k
columns, and transposes it (LOGITS_AS_FORWARD): a BLAS (the interpreter's tl.dot) need not give
k.q the same bits as q.k. Nothing of size N x M is ever stored and every accumulator is fp32.
With logits s = scale * q.k and p = softmax(s):

    delta_i = sum_c dO[c, i] * O[c, i] - dlse_i      (dlse: the gradient of the returned lse,
                                                       since d lse_i / d s_ij = p_ij)
    dV[:, j] = sum_i p_ij dO[:, i]
    ds_ij    = p_ij * (dO[:, i] . V[:, j] - delta_i)
    dK[:, j] = scale * sum_i ds_ij q[:, i]     dQ[:, i] = scale * sum_j ds_ij k[:, j]

Design (two-pass vs one pass with atomic dQ): both are built, selected per configuration by
`BackwardConfig.atomic_dq`, because the choice is a measurement this session could not make (no
GPU). One pass computes s, p and dp once per (query, key) pair: 3 d_qk + 2 d_v MACs and one exp
per pair. Two passes recompute s, p and dp in the dQ kernel: + d_qk + d_v MACs and a second exp
per pair, about +50% at the BigGAN sites (d_qk 24, d_v 96), against the atomic pass's
(M / block_m) * N * d_qk fp32 atomic adds (~1.6 M per batch element at BigGAN-128, small next
to its 4 M pairs). By that count one pass should win when d_qk is small, as in every GAN site,
so the autotuner's table lists it first; but atomics make dQ's summation order, hence its last
bits, vary from run to run, so the fixed (deterministic) configuration uses two passes.
Registers (offline sm_90 compile, tests/backends/triton/test_triton_compile.py): the dQ partial costs the
one-pass dK/dV program registers, so at 4 warps it fits only with 16-query steps (64x32 spilled
224 B); at 8 warps 128x32 fits either way.
Unmeasured: which variant is faster on a GPU. The autotuner times both per shape (unless
FASTATTN_TRITON_CONFIG is "fixed"); the fixed configuration is two-pass.

d_v: when the padded d_v fits `block_dv`, one dK/dV program holds v and accumulates both dK and
dV. Wider values take two launches: dK (with dp summed over DP_CHUNK-wide d_v chunks, p
computed once) and dV split over d_v in `dv_slice`-wide slices, each of which recomputes s and
p. Exponentials per (query, key) pair, two-pass (atomic dQ: one fewer): fused 2; split
2 + ceil(d_v / dv_slice). p needs no rescale here (it is exact from the forward's m and l), so
unlike the forward's (kernels/forward.py) a wider slice costs only its accumulator's registers:
dv_slice 256 (was block_dv, 128) takes exponentials per pair from 4 to 3 at d_v 192 and 256, 5
to 4 at 300, 6 to 4 at 512 and 10 to 6 at 1024, and the dV launch's s recompute (d_qk MACs
per pair per slice) and q/k loads halve with them. Computing p once for all of d_v would need a
(block_m, d_v) fp32 dv accumulator, d_v / 2 registers per thread at 16 rows per warp (512 at
d_v 1024): it does not fit. The 256-wide dV program (64x16, 4 warps, d_qk 64) takes 194
registers aligned; ragged it spilled 128 B, so ragged launches keep 128 (configs._MAX_DV_SLICE).
fp32 (FMA dots, twice the registers) keeps 128.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import DP_CHUNK
from .forward import LOG2E_CONST

__all__ = ["launch_backward"]

# Tile of the delta kernel: queries per program and value channels per inner step. Memory bound
# and tiny next to the attention kernels; not tuned.
_DELTA_BLOCK_N = 128
_DELTA_BLOCK_DV = 16


@triton.jit
def attention_backward_delta_kernel(
    do_ptr, out_ptr, dlse_ptr, delta_ptr,
    stride_dob, stride_dod, stride_don,
    stride_ob, stride_od, stride_on,
    stride_lb, stride_ln,
    n_queries, d_v,
    HAS_DLSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_queries
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, d_v, BLOCK_DV):
        offs_c = c0 + tl.arange(0, BLOCK_DV)
        mask = (offs_c < d_v)[:, None] & mask_n[None, :]
        do = tl.load(do_ptr + batch * stride_dob + offs_c[:, None] * stride_dod + offs_n[None, :] * stride_don,
                     mask=mask, other=0.0)
        o = tl.load(out_ptr + batch * stride_ob + offs_c[:, None] * stride_od + offs_n[None, :] * stride_on,
                    mask=mask, other=0.0)
        acc += tl.sum(do.to(tl.float32) * o.to(tl.float32), 0)
    if HAS_DLSE:
        acc -= tl.load(dlse_ptr + batch * stride_lb + offs_n * stride_ln, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(delta_ptr + batch * n_queries + offs_n, acc, mask=mask_n)


@triton.jit
def attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, delta_ptr, dq_acc_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_km,
    stride_vb, stride_vd, stride_vm,
    stride_dob, stride_dod, stride_don,
    stride_sb, stride_ss, stride_sn,
    n_queries, n_keys, d_qk, d_v,
    scale,
    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, LOGITS_AS_FORWARD: tl.constexpr,
):
    """dq_acc (fp32), dk and dv are contiguous (B, d, len) buffers made by the launcher."""
    pid_m = tl.program_id(0)
    pid_dv = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    mask_m = offs_m < n_keys
    mask_d = offs_d < d_qk
    mask_dv = offs_dv < d_v

    # k as (D_PAD, BLOCK_M), the forward's orientation, or as (BLOCK_M, D_PAD);
    # v as (BLOCK_M, BLOCK_DV) when this program holds all of d_v
    k_base = k_ptr + batch * stride_kb
    if LOGITS_AS_FORWARD:
        k_dm = tl.load(k_base + offs_d[:, None] * stride_kd + offs_m[None, :] * stride_km,
                       mask=mask_d[:, None] & mask_m[None, :], other=0.0)
    else:
        k = tl.load(k_base + offs_m[:, None] * stride_km + offs_d[None, :] * stride_kd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        k_dm = tl.trans(k)
    v_base = v_ptr + batch * stride_vb + offs_m[:, None] * stride_vm
    if WITH_DK and WITH_DV:
        v = tl.load(v_base + offs_dv[None, :] * stride_vd, mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
    q_base = q_ptr + batch * stride_qb
    do_base = do_ptr + batch * stride_dob
    stats_base = stats_ptr + batch * stride_sb
    dk = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    for start_n in range(0, n_queries, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < n_queries
        # padded queries get m = +inf, hence p = 0
        row_max = tl.load(stats_base + offs_n * stride_sn, mask=mask_n, other=float("inf"))
        inv_sum = 1.0 / tl.load(stats_base + stride_ss + offs_n * stride_sn, mask=mask_n, other=1.0)
        if LOGITS_AS_FORWARD:
            # q as (BLOCK_N, D_PAD): the same dot as the forward's, transposed after
            q_nd = tl.load(q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                           mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            s_t = tl.trans(tl.dot(q_nd, k_dm, input_precision=INPUT_PRECISION, out_dtype=tl.float32)) * scale
        else:
            q_dn = tl.load(q_base + offs_d[:, None] * stride_qd + offs_n[None, :] * stride_qn,
                           mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            s_t = tl.dot(k, q_dn, input_precision=INPUT_PRECISION, out_dtype=tl.float32) * scale
            q_nd = tl.trans(q_dn)
        p_t = tl.math.exp2((s_t - row_max[None, :]) * LOG2E_CONST) * inv_sum[None, :]  # (BLOCK_M, BLOCK_N)
        # Padded keys (k loaded as 0, so s = 0) must get p = 0: with a row max below about
        # -88.7, exp(0 - m) overflows to inf, and inf * (k = 0) in the atomic dQ would be NaN.
        p_t = tl.where(mask_m[:, None], p_t, 0.0)
        if WITH_DV:
            do = tl.load(do_base + offs_dv[:, None] * stride_dod + offs_n[None, :] * stride_don,
                         mask=mask_dv[:, None] & mask_n[None, :], other=0.0)
            dv = tl.dot(p_t.to(do.dtype), tl.trans(do), dv, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        if WITH_DK:
            if WITH_DV:
                dp_t = tl.dot(v, do, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
            else:
                dp_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for c0 in range(0, d_v, BLOCK_DV):
                    offs_c = c0 + tl.arange(0, BLOCK_DV)
                    mask_c = offs_c < d_v
                    v_c = tl.load(v_base + offs_c[None, :] * stride_vd, mask=mask_m[:, None] & mask_c[None, :],
                                  other=0.0)
                    do_c = tl.load(do_base + offs_c[:, None] * stride_dod + offs_n[None, :] * stride_don,
                                   mask=mask_c[:, None] & mask_n[None, :], other=0.0)
                    dp_t = tl.dot(v_c, do_c, dp_t, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
            delta = tl.load(delta_ptr + batch * n_queries + offs_n, mask=mask_n, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q_nd.dtype), q_nd, dk, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
            if ATOMIC_DQ:
                # (D_PAD, BLOCK_N): padded keys have k = 0 and contribute nothing
                dq_part = tl.dot(k_dm, ds_t.to(k_dm.dtype), input_precision=INPUT_PRECISION,
                                 out_dtype=tl.float32)
                dq_ptrs = dq_acc_ptr + batch * d_qk * n_queries + offs_d[:, None] * n_queries + offs_n[None, :]
                tl.atomic_add(dq_ptrs, dq_part * scale, mask=mask_d[:, None] & mask_n[None, :], sem="relaxed")

    if WITH_DV:
        dv_ptrs = dv_ptr + batch * d_v * n_keys + offs_dv[None, :] * n_keys + offs_m[:, None]
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])
    if WITH_DK:
        dk_ptrs = dk_ptr + batch * d_qk * n_keys + offs_d[None, :] * n_keys + offs_m[:, None]
        tl.store(dk_ptrs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, stats_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_km,
    stride_vb, stride_vd, stride_vm,
    stride_dob, stride_dod, stride_don,
    stride_sb, stride_ss, stride_sn,
    n_queries, n_keys, d_qk, d_v,
    scale,
    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    DV_SINGLE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Second pass: dQ for BLOCK_N queries, walking over all keys. dq is a contiguous buffer."""
    pid_n = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_c0 = tl.arange(0, BLOCK_DV)
    offs_m0 = tl.arange(0, BLOCK_M)
    mask_n = offs_n < n_queries
    mask_d = offs_d < d_qk

    q = tl.load(q_ptr + batch * stride_qb + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    stats_base = stats_ptr + batch * stride_sb + offs_n * stride_sn
    row_max = tl.load(stats_base, mask=mask_n, other=float("inf"))
    inv_sum = 1.0 / tl.load(stats_base + stride_ss, mask=mask_n, other=1.0)
    delta = tl.load(delta_ptr + batch * n_queries + offs_n, mask=mask_n, other=0.0)
    do_base = do_ptr + batch * stride_dob + offs_n[:, None] * stride_don  # (BLOCK_N, 1)
    if DV_SINGLE:
        do = tl.load(do_base + offs_c0[None, :] * stride_dod, mask=mask_n[:, None] & (offs_c0 < d_v)[None, :],
                     other=0.0)
    k_base = k_ptr + batch * stride_kb + offs_d[:, None] * stride_kd
    v_base = v_ptr + batch * stride_vb
    dq = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    for start_m in range(0, n_keys, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < n_keys
        k = tl.load(k_base + offs_m[None, :] * stride_km, mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION, out_dtype=tl.float32) * scale
        p = tl.math.exp2((s - row_max[:, None]) * LOG2E_CONST) * inv_sum[:, None]
        p = tl.where(mask_m[None, :], p, 0.0)
        if DV_SINGLE:
            v = tl.load(v_base + offs_c0[:, None] * stride_vd + offs_m[None, :] * stride_vm,
                        mask=(offs_c0 < d_v)[:, None] & mask_m[None, :], other=0.0)
            dp = tl.dot(do, v, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        else:
            dp = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for c0 in range(0, d_v, BLOCK_DV):
                offs_c = c0 + offs_c0
                mask_c = offs_c < d_v
                do_c = tl.load(do_base + offs_c[None, :] * stride_dod, mask=mask_n[:, None] & mask_c[None, :],
                               other=0.0)
                v_c = tl.load(v_base + offs_c[:, None] * stride_vd + offs_m[None, :] * stride_vm,
                              mask=mask_c[:, None] & mask_m[None, :], other=0.0)
                dp = tl.dot(do_c, v_c, dp, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), tl.trans(k), dq, input_precision=INPUT_PRECISION, out_dtype=tl.float32)

    dq_ptrs = dq_ptr + batch * d_qk * n_queries + offs_d[None, :] * n_queries + offs_n[:, None]
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def launch_backward(kernel_call, grad_out, grad_lse, q, k, v, out, stats, scale, precision, config, d_pad, dv_pad):
    """(dq, dk, dv), contiguous, in the inputs' dtype. `stats` is the forward's (B, 2, N) fp32
    row max and row sum (kernels/forward.py); grad_lse may be None. `kernel_call` as in
    launch_forward."""
    batch, d_qk, n_queries = q.shape
    d_v, n_keys = v.shape[1], v.shape[2]
    dk = torch.empty((batch, d_qk, n_keys), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, d_v, n_keys), dtype=v.dtype, device=v.device)
    if n_queries == 0:  # no query: every gradient is zero
        return torch.zeros((batch, d_qk, 0), dtype=q.dtype, device=q.device), dk.zero_(), dv.zero_()
    delta = torch.empty((batch, n_queries), dtype=torch.float32, device=q.device)
    block_n = max(16, min(_DELTA_BLOCK_N, triton.next_power_of_2(int(n_queries))))
    kernel_call(attention_backward_delta_kernel)[(triton.cdiv(n_queries, block_n), batch)](
        grad_out, out, grad_lse if grad_lse is not None else delta, delta,
        *_strides(grad_out), *_strides(out),
        *((grad_lse.stride(0), grad_lse.stride(1)) if grad_lse is not None else (0, 0)),
        n_queries, d_v,
        HAS_DLSE=grad_lse is not None, BLOCK_N=block_n, BLOCK_DV=_DELTA_BLOCK_DV, num_warps=4, num_stages=2,
    )

    c = config
    fused = dv_pad <= c.block_dv
    atomic = c.atomic_dq
    if atomic:
        dq_buffer = torch.zeros((batch, d_qk, n_queries), dtype=torch.float32, device=q.device)
    else:
        dq_buffer = torch.empty((batch, d_qk, n_queries), dtype=q.dtype, device=q.device)
    common = dict(D_PAD=d_pad, INPUT_PRECISION=precision, num_warps=c.num_warps, num_stages=c.num_stages)
    args = (q, k, v, grad_out, stats, delta, dq_buffer, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(stats),
            n_queries, n_keys, d_qk, d_v, float(scale))
    n_key_blocks = triton.cdiv(n_keys, c.block_m)
    common_dkdv = dict(common, LOGITS_AS_FORWARD=q.element_size() == 4)
    if fused:
        kernel_call(attention_backward_dkdv_kernel)[(n_key_blocks, 1, batch)](
            *args, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_DV=dv_pad,
            WITH_DK=True, WITH_DV=True, ATOMIC_DQ=atomic, **common_dkdv)
    else:
        dp_chunk = min(c.block_dv, DP_CHUNK)
        kernel_call(attention_backward_dkdv_kernel)[(n_key_blocks, 1, batch)](
            *args, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_DV=dp_chunk,
            WITH_DK=True, WITH_DV=False, ATOMIC_DQ=atomic, **common_dkdv)
        kernel_call(attention_backward_dkdv_kernel)[(n_key_blocks, triton.cdiv(d_v, c.dv_slice), batch)](
            *args, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_DV=c.dv_slice,
            WITH_DK=False, WITH_DV=True, ATOMIC_DQ=False, **common_dkdv)
    if atomic:
        return dq_buffer.to(q.dtype), dk, dv
    kernel_call(attention_backward_dq_kernel)[(triton.cdiv(n_queries, c.block_n_dq), batch)](
        q, k, v, grad_out, stats, delta, dq_buffer,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(stats),
        n_queries, n_keys, d_qk, d_v, float(scale),
        BLOCK_N=c.block_n_dq, BLOCK_M=c.block_m_dq, BLOCK_DV=dv_pad if fused else min(c.block_dv, DP_CHUNK),
        DV_SINGLE=fused, **common)
    return dq_buffer, dk, dv
