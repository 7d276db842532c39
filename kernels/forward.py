"""Forward kernel: out (B, d_v, N), the natural-log lse (B, N) and the softmax statistics.

Layout: q (B, d_qk, N), k (B, d_qk, M), v (B, d_v, M) and out (B, d_v, N) are read and written
through their strides, channel-major as 1x1 convolutions produce them (the contiguous axis is
usually N or M, so tile loads are coalesced along it). No host-side transpose or copy.

One program owns `BLOCK_N` queries and `BLOCK_DV` value channels of one batch element and
walks over the keys `BLOCK_M` at a time with an online softmax. Logits, statistics and the
output accumulator are fp32. The logits s = scale * q.k stay in natural units, as the naive
path's, and exponentials are exp2((s - m) * log2 e): the difference to the row max m is exact
near the max and small, so the log2(e) factor's rounding costs nothing there. Folding log2(e)
into the scale instead (one multiply per pair fewer) rounds every logit once more, by up to
|s| * 2^-24, which made the output's fp32 error 2.5x the naive path's at |s| ~ 1e4.
d_qk is padded to a power of two >= 16 with masked loads (zero padding adds exact zeros to the
dot products). d_v wider than BLOCK_DV is split across programs (grid axis 1); each recomputes
QK^T and the exponentials. Only the first value split stores the lse and the statistics, which
every split computes identically.

Why wide d_v keeps that split (issue 14 item 5). Per (query, key) pair the forward evaluates
S = ceil(d_v / BLOCK_DV) exponentials (BLOCK_DV 128: 8 at d_v 1024, 3 at d_v 300) and S * d_qk
extra MACs. Computing p once per tile needs the output accumulators of every d_v chunk alive
across the key loop, whatever the loop order: BLOCK_N x d_v fp32, and since tl.dot gives each
warp at least 16 rows, at least 16 * d_v / 32 = d_v / 2 registers per thread (512 at d_v 1024;
255 is the limit, and the logits tile and q need ~30-90 of them). Holding them in global memory
instead (read-rescale-write per key block) moves 8 * d_v / BLOCK_M bytes per pair (128 B at
d_v 1024, BLOCK_M 64) against ~2 B of tile loads today. Two passes (row max and sum over all
keys first, then exact p per slice) cost 1 + S exponentials instead of S. The one lever that
fits registers is a wider slice: BLOCK_DV 256 (acc 128 registers per thread) halves S, but it
passes the register budget only with BLOCK_M = 16 at d_qk <= 32 (configs._forward_cost: 128x16
at 8 warps costs 144 at d_qk 24, 152 at d_qk 64; budgets 144 aligned, 88 ragged), and the
online-softmax rescale of the accumulator, BLOCK_DV / BLOCK_M fp32 multiplies per pair per
slice, then eats what the exponentials save. Per pair per slice on an H100 SM (16 exp/clk on
the MUFU, 128 fp32 op/clk, ~4 other fp32 ops per pair): 1/16 + 128/(64*128) + 4/128 = 0.109
clk now (128-wide, 64-key steps) against 1/16 + 256/(16*128) + 4/128 = 0.219 clk (256-wide,
16-key steps): 8 x 0.109 = 0.875 = 4 x 0.219 clk per pair at d_v 1024, no gain, and 16-key
steps pipeline worse. So the split is kept; the backward, which has no rescale, does widen its
slice (kernels/backward.py).

Statistics for the backward, `stats` (B, 2, N) fp32: row 0 the row maximum m of the logits
exactly as this kernel computed them, row 1 the row sum l = sum_j exp2((s_j - m) * log2 e).
The backward recomputes s with the same arithmetic and forms p = exp2((s - m) * log2 e) / l,
so the largest probability of a row is exactly 1 / l, as in the naive softmax. Recomputing p
from the lse, exp(s - lse), would carry the lse's rounding (|lse| * 2^-24) into every p: ~1e-3
at |logits| ~ 1e4 (kernels/backward.py). With scale == 1 (unscaled GAN logits) s is the dot
itself, so the bit-for-bit recompute holds even if the compiler fuses s - m into an FMA.

UNMASKED_FULL_TILES (fp16/bf16): full key tiles skip the key mask and only the ragged last tile
is masked. For fp32 (FMA dots) the second inlined copy of the step pushed every tile size
into register spills in the offline compile (tests/backends/triton/test_triton_compile.py), so fp32 keeps one
masked loop.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["attention_forward_kernel", "launch_forward"]

LOG2E = 1.4426950408889634
# Kernels may read module globals only when they are tl.constexpr.
LOG2E_CONST = tl.constexpr(LOG2E)
LN2_CONST = tl.constexpr(0.6931471805599453)


@triton.jit
def _forward_step(acc, l_i, m_i, q, k_base, v_base, start_m, n_keys, stride_km, stride_vm, mask_d, mask_dv,
                  scale, BLOCK_M: tl.constexpr, MASK_KEYS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One block of keys of the online softmax. Only the last, ragged block masks keys: the
    full blocks skip the key mask on loads and logits."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if MASK_KEYS:
        mask_m = offs_m < n_keys
        k_mask = mask_d[:, None] & mask_m[None, :]
        v_mask = mask_m[:, None] & mask_dv[None, :]
    else:
        k_mask = mask_d[:, None]
        v_mask = mask_dv[None, :]
    # k as (D_PAD, BLOCK_M) straight from the channel-major layout
    k = tl.load(k_base + offs_m[None, :] * stride_km, mask=k_mask, other=0.0)
    s = tl.dot(q, k, input_precision=INPUT_PRECISION, out_dtype=tl.float32) * scale
    if MASK_KEYS:
        s = tl.where(mask_m[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2((m_i - m_new) * LOG2E_CONST)
    p = tl.math.exp2((s - m_new[:, None]) * LOG2E_CONST)
    l_i = l_i * alpha + tl.sum(p, 1)
    # v as (BLOCK_M, BLOCK_DV): element (j, c) = v[b, c, j]
    v = tl.load(v_base + offs_m[:, None] * stride_vm, mask=v_mask, other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
    return acc, l_i, m_new


@triton.jit
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, stats_ptr,
    stride_qb, stride_qd, stride_qn,
    stride_kb, stride_kd, stride_km,
    stride_vb, stride_vd, stride_vm,
    stride_ob, stride_od, stride_on,
    stride_lb, stride_ln,
    stride_sb, stride_ss, stride_sn,
    n_queries, n_keys, d_qk, d_v,
    scale,  # runtime
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UNMASKED_FULL_TILES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_dv = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_n = offs_n < n_queries
    mask_d = offs_d < d_qk
    mask_dv = offs_dv < d_v

    # q as (BLOCK_N, D_PAD): element (i, c) = q[b, c, i]
    q_ptrs = q_ptr + batch * stride_qb + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + batch * stride_kb + offs_d[:, None] * stride_kd  # (D_PAD, 1)
    v_base = v_ptr + batch * stride_vb + offs_dv[None, :] * stride_vd  # (1, BLOCK_DV)

    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    if UNMASKED_FULL_TILES:
        n_full = (n_keys // BLOCK_M) * BLOCK_M
        for start_m in range(0, n_full, BLOCK_M):
            acc, l_i, m_i = _forward_step(acc, l_i, m_i, q, k_base, v_base, start_m, n_keys, stride_km, stride_vm,
                                          mask_d, mask_dv, scale, BLOCK_M, False, INPUT_PRECISION)
        if n_full < n_keys:
            acc, l_i, m_i = _forward_step(acc, l_i, m_i, q, k_base, v_base, n_full, n_keys, stride_km, stride_vm,
                                          mask_d, mask_dv, scale, BLOCK_M, True, INPUT_PRECISION)
    else:
        for start_m in range(0, n_keys, BLOCK_M):
            acc, l_i, m_i = _forward_step(acc, l_i, m_i, q, k_base, v_base, start_m, n_keys, stride_km, stride_vm,
                                          mask_d, mask_dv, scale, BLOCK_M, True, INPUT_PRECISION)

    acc = acc / l_i[:, None]
    out_ptrs = out_ptr + batch * stride_ob + offs_n[:, None] * stride_on + offs_dv[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_dv[None, :])
    if pid_dv == 0:
        lse = m_i + tl.math.log2(l_i) * LN2_CONST
        tl.store(lse_ptr + batch * stride_lb + offs_n * stride_ln, lse, mask=mask_n)
        stats_base = stats_ptr + batch * stride_sb + offs_n * stride_sn
        tl.store(stats_base, m_i, mask=mask_n)
        tl.store(stats_base + stride_ss, l_i, mask=mask_n)


def launch_forward(kernel_call, q, k, v, out, lse, stats, scale, precision, config, d_pad):
    """Launch the forward on preallocated out, lse (B, N) and stats (B, 2, N), both fp32.
    `kernel_call(kernel)` returns something indexable by a grid (the kernel itself, or
    torch.library.wrap_triton(kernel))."""
    batch, d_qk, n_queries = q.shape
    d_v, n_keys = v.shape[1], v.shape[2]
    # at least one value split, so that the lse is written even when d_v == 0
    grid = (triton.cdiv(n_queries, config.block_n), max(1, triton.cdiv(d_v, config.block_dv)), batch)
    kernel_call(attention_forward_kernel)[grid](
        q, k, v, out, lse, stats,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        stats.stride(0), stats.stride(1), stats.stride(2),
        n_queries, n_keys, d_qk, d_v,
        float(scale),
        D_PAD=d_pad, BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_DV=config.block_dv,
        INPUT_PRECISION=precision, UNMASKED_FULL_TILES=q.element_size() < 4,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
