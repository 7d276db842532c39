"""Launch configurations of the attention kernels, kept as data, and their pruning.

Naming follows the kernels: N queries, M keys/values. The forward program owns `block_n`
queries and `block_dv` value channels and walks over the keys `block_m` at a time. The
backward dK/dV program owns `block_m` keys and walks over the queries `block_n` at a time; the
two-pass dQ program owns `block_n_dq` queries and walks over the keys `block_m_dq` at a time.
When d_v is wider than `block_dv`, the backward's dV launch gives each program `block_m` keys
and `dv_slice` value channels (256 for fp16/bf16 aligned launches: half the recomputed
exponentials of 128-wide slices, kernels/backward.py).

Provenance. Timing: none of these entries has been timed on a GPU; on CUDA the autotuner times
the candidates per shape class at run time and keeps the fastest (`tuned_configs()` lists them).
Register fit: measured by compiling every kernel variant for sm_90 with Triton 3.9 without a GPU,
specialised as a real launch is (kernels/offline_compile.py: ints divisible by 16 and pointers
16-byte aligned get `tt.divisibility`, unit strides become constants), and reading the cubin's
resource usage (tests/backends/triton/test_triton_compile.py repeats it). The specialisation
splits every shape in two:
  aligned (every stride 1 or a multiple of 16: contiguous inputs with N and M multiples of 16,
  every GAN site): vectorised loads pipelined with cp.async, fewer registers, more shared memory.
  BigGAN-128 site (d_qk 24, d_v 96), bf16, regs/spill bytes/shared KB:
    forward 128x64/8w 164/0/68, 128x128/8w 220/0/128 (2 stages: 230/0/88), 64x64/4w 168/0/64;
    dK/dV 128x64/8w 225/0/81 (atomic dQ 238/0/105), 128x32/8w 180-218/0, 64x64/4w 233/0;
    dQ 128x128/8w 202/0/120, 128x64/8w 120/0/80. Nothing in the tables spills.
  ragged (N = 4093, M = 1021): scalar loads, masks on every access, 222-255 registers:
    forward 128x32/8w 222/0 and 64x32/4w 255/0 fit; every block_m = 64 tile spills
    (128x64/8w 8 B, 64x64/4w 632 B, 64x64 with block_dv 64 32 B, 128x128/8w 832 B).
    dK/dV only 64x16/4w two-pass fits (255/0); 128x32/8w two-pass 32 B, atomic 136 B,
    64x16/4w atomic 64 B, 64x32/4w 296 B, 128x64/8w 328-448 B. dQ 128x64/8w 225/0 fits,
    128x32/4w spills 96 B.
The pruning rules below are calibrated on those numbers: one budget for aligned launches, a
tighter one (and block_m <= 32 in the forward) for ragged ones.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "ForwardConfig",
    "BackwardConfig",
    "FORWARD_CONFIGS",
    "BACKWARD_CONFIGS",
    "FIXED_FORWARD",
    "FIXED_BACKWARD",
    "FORWARD_CONFIGS_FP32",
    "BACKWARD_CONFIGS_FP32",
    "FIXED_FORWARD_FP32",
    "FIXED_BACKWARD_FP32",
    "tables",
    "INTERPRETER_FORWARD",
    "INTERPRETER_BACKWARD",
    "DP_CHUNK",
    "pad_width",
    "launch_aligned",
    "forward_candidates",
    "backward_candidates",
]


@dataclass(frozen=True)
class ForwardConfig:
    block_n: int  # queries per program
    block_m: int  # keys per inner step
    block_dv: int  # value channels per program (d_v wider than this is split across programs)
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class BackwardConfig:
    block_m: int  # keys per dK/dV program
    block_n: int  # queries per inner step of the dK/dV program
    block_n_dq: int  # queries per program of the two-pass dQ kernel
    block_m_dq: int  # keys per inner step of the dQ kernel
    block_dv: int  # d_v up to this is held whole in the dK/dV program; wider is split
    atomic_dq: bool  # one pass with dQ accumulated by fp32 atomics (non-deterministic order)
    num_warps: int = 4
    num_stages: int = 2
    # value channels per program of the dV launch when d_v is split (wider than block_dv); each
    # program recomputes p, so d_v / dv_slice exponentials per (query, key) pair (kernels/backward.py)
    dv_slice: int = 256


FORWARD_CONFIGS: tuple[ForwardConfig, ...] = (
    ForwardConfig(128, 128, 128, num_warps=8, num_stages=3),  # aligned shapes only (see pruning)
    ForwardConfig(128, 64, 128, num_warps=8, num_stages=3),
    ForwardConfig(128, 32, 128, num_warps=8, num_stages=3),
    ForwardConfig(64, 64, 128, num_warps=4, num_stages=3),
    ForwardConfig(64, 32, 128, num_warps=4, num_stages=3),
    ForwardConfig(64, 64, 64, num_warps=4, num_stages=3),  # wide d_v: more, narrower value splits
)

BACKWARD_CONFIGS: tuple[BackwardConfig, ...] = (
    BackwardConfig(128, 64, 128, 64, 128, atomic_dq=True, num_warps=8, num_stages=2),  # aligned only
    BackwardConfig(128, 64, 128, 64, 128, atomic_dq=False, num_warps=8, num_stages=2),  # aligned only
    BackwardConfig(128, 32, 128, 64, 128, atomic_dq=True, num_warps=8, num_stages=2),
    BackwardConfig(64, 16, 128, 32, 128, atomic_dq=True, num_warps=4, num_stages=3),
    BackwardConfig(128, 32, 128, 64, 128, atomic_dq=False, num_warps=8, num_stages=2),
    BackwardConfig(64, 32, 128, 32, 128, atomic_dq=False, num_warps=4, num_stages=2),
    BackwardConfig(64, 16, 128, 32, 128, atomic_dq=False, num_warps=4, num_stages=3),
)

# fp32 inputs: with full-precision ("ieee") dots Triton multiplies on FMA units with operands in
# registers, so the same tiles need about twice the registers. Offline compile (sm_90, d_qk 24,
# d_v 96): forward 64x16/4w 182 regs and 128x16/8w 180 regs, no spill; 128x32/8w 254, no
# spill. Every backward tile tried spilled (dK/dV 32x16/2w 408 B, 64x16/4w 790 B; dQ 64x32/4w
# 560 B, 32x16/2w 712 B): these are the least-spilling ones. (TF32 dots use tensor cores and
# fit like bf16, but the table cannot know the precision setting, so it serves both.)
FORWARD_CONFIGS_FP32: tuple[ForwardConfig, ...] = (
    ForwardConfig(128, 16, 128, num_warps=8, num_stages=2),
    ForwardConfig(64, 16, 128, num_warps=4, num_stages=2),
    ForwardConfig(128, 32, 128, num_warps=8, num_stages=3),
)
BACKWARD_CONFIGS_FP32: tuple[BackwardConfig, ...] = (
    BackwardConfig(32, 16, 64, 32, 128, atomic_dq=False, num_warps=2, num_stages=2, dv_slice=128),
    BackwardConfig(64, 16, 64, 32, 128, atomic_dq=False, num_warps=4, num_stages=1, dv_slice=128),
    BackwardConfig(32, 16, 64, 32, 128, atomic_dq=True, num_warps=2, num_stages=2, dv_slice=128),
)

# The fixed configuration (FASTATTN_TRITON_CONFIG=fixed, or torch deterministic algorithms on):
# no autotuning and a two-pass backward, so repeated runs give bit-identical results.
FIXED_FORWARD = ForwardConfig(64, 32, 128, num_warps=4, num_stages=2)
FIXED_BACKWARD = BackwardConfig(64, 16, 128, 32, 128, atomic_dq=False, num_warps=4, num_stages=2)
FIXED_FORWARD_FP32 = ForwardConfig(64, 16, 128, num_warps=4, num_stages=2)
FIXED_BACKWARD_FP32 = BackwardConfig(32, 16, 64, 32, 128, atomic_dq=False, num_warps=2, num_stages=2, dv_slice=128)

# Under TRITON_INTERPRET=1 every program runs in numpy: the smallest tiles tl.dot accepts keep
# the CI tests fast, and block_dv=64 makes the tests' d_v in {96, 300} take the split paths.
INTERPRETER_FORWARD = ForwardConfig(16, 16, 64, num_warps=1, num_stages=1)
INTERPRETER_BACKWARD = BackwardConfig(16, 16, 16, 16, 64, atomic_dq=False, num_warps=1, num_stages=1, dv_slice=64)

# When pruning leaves nothing (d_qk near 256, fp32 with wide values): small tiles that fit.
FALLBACK_FORWARD = ForwardConfig(64, 16, 64, num_warps=4, num_stages=1)
FALLBACK_BACKWARD = BackwardConfig(64, 16, 64, 16, 64, atomic_dq=False, num_warps=4, num_stages=1, dv_slice=64)

# Budgets of the pruning rules (see _forward_cost / _backward_cost for what they count), for
# (aligned, ragged) launches: calibrated on the specialised offline compile above, where the
# configs up to these costs fit 255 registers without spilling and the next larger ones spill.
# Aligned: forward 128x128/8w costs 136 at d_qk 24 and 144 at d_qk 64 (fit, 220-242 regs); dK/dV 128x64/8w atomic costs 332
# (fits, 238 regs; 352 at d_qk 64, 210 regs). Ragged: forward 128x32/8w and 64x32/4w cost 88 at d_qk 24 (fit) and 96 at
# d_qk 64 (64x32/4w spills 64 B), 64x64 with block_dv 64 costs 72 but spills, hence also
# _RAGGED_MAX_BLOCK_M; dK/dV 64x16/4w two-pass costs 162 (fits),
# 128x32/8w two-pass 194 (spills 32 B). Shared memory when the device does not report its own
# limit: 99 KiB (Ampere consumer parts).
_FORWARD_BUDGET = {True: 144, False: 88}
_FORWARD_BUDGET_FP32 = 112  # the fp32 table, vetted on the unspecialised compile (closest to ragged)
_BACKWARD_BUDGET = {True: 360, False: 180}  # fp16/bf16; fp32 backward tiles all spill a little, vetted by hand
_RAGGED_MAX_BLOCK_M = 32
# Widest dV-launch slice (BackwardConfig.dv_slice) for (aligned, ragged) launches: the dV program
# 64x16/4w at d_qk 64 with a 256-wide slice takes 194 registers aligned (no spill) and spills
# 128 B ragged (255 registers), where a 128-wide one fits (sm_90, fp16/bf16 offline compile).
_MAX_DV_SLICE = {True: 256, False: 128}
_DEFAULT_SHARED_BYTES = 99 * 1024
# tl.dot on NVIDIA gives each warp 16-row slices: a tile with fewer rows per warp replicates
# work and, in the offline compile, always spilled.
_ROWS_PER_WARP = 16
# Value channels per step of the dp = V^T dO loops when d_v is split (the dK launch and the
# dQ kernel): 128 spilled at d_qk 64 / d_v 256 in the offline compile.
DP_CHUNK = 64


def tables(elem_bytes: int):
    """(forward table, backward table, fixed forward, fixed backward) for an element size."""
    if elem_bytes == 4:
        return FORWARD_CONFIGS_FP32, BACKWARD_CONFIGS_FP32, FIXED_FORWARD_FP32, FIXED_BACKWARD_FP32
    return FORWARD_CONFIGS, BACKWARD_CONFIGS, FIXED_FORWARD, FIXED_BACKWARD


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def pad_width(width: int) -> int:
    """A channel width padded to a power of two >= 16 (tl.dot's smallest operand side)."""
    return max(16, _pow2(int(width)))


def _clamp(block: int, length: int) -> int:
    """No wider than the (padded) length it tiles: larger tiles only add masked work."""
    return max(16, min(block, _pow2(length)))


def _warps(num_warps, *row_blocks):
    return max(1, min(num_warps, *(rows // _ROWS_PER_WARP for rows in row_blocks)))


def _clamp_forward(c, n, m, d_v, aligned=True):
    block_n = _clamp(c.block_n, n)
    return replace(c, block_n=block_n, block_m=_clamp(c.block_m, m),
                   block_dv=min(pad_width(c.block_dv), pad_width(d_v)), num_warps=_warps(c.num_warps, block_n))


def _clamp_backward(c, n, m, d_v, aligned=True):
    block_m, block_n_dq, block_m_dq = _clamp(c.block_m, m), _clamp(c.block_n_dq, n), _clamp(c.block_m_dq, m)
    num_warps = _warps(c.num_warps, block_m, block_n_dq)
    if pad_width(d_v) > c.block_dv:
        # split d_v: the dQ kernel's dp loop spilled at 128x32/4 warps (848 B) and 128x64/8 warps
        # (184 B) and fit at 64x16/4 warps and 128x32/8 warps (offline compile, d_qk 64, d_v 256)
        if num_warps < 8:
            block_n_dq, block_m_dq = min(block_n_dq, 64), min(block_m_dq, 16)
        else:
            block_m_dq = min(block_m_dq, 32)
    if not aligned and num_warps < 8:  # ragged: the 4-warp 128x32 dQ tile spilled 96 B
        block_n_dq = min(block_n_dq, 64)
    dv_slice = min(pad_width(c.dv_slice), pad_width(d_v), _MAX_DV_SLICE[aligned])
    return replace(c, block_m=block_m, block_n=_clamp(c.block_n, n), block_n_dq=block_n_dq,
                   block_m_dq=block_m_dq, block_dv=min(pad_width(c.block_dv), pad_width(d_v)),
                   dv_slice=dv_slice, num_warps=_warps(num_warps, block_n_dq))


def _forward_cost(c, d_pad, dv_pad, elem_bytes):
    """(register cost per thread, shared-memory bytes) of a forward program: the fp32
    accumulator plus the logits tile, which costs twice as much for fp32 inputs (FMA dots), plus
    the q tile (input dtype) held for the whole key loop."""
    cost = (c.block_n * (c.block_dv + c.block_m * elem_bytes // 2) + c.block_n * d_pad * elem_bytes // 4) / (
        32 * c.num_warps)
    smem = c.num_stages * c.block_m * (d_pad + c.block_dv) * elem_bytes + c.block_n * d_pad * elem_bytes
    return cost, smem


def _backward_cost(c, d_pad, dv_pad, elem_bytes):
    """As _forward_cost, for the dK/dV program (the larger of the backward's programs): four
    (block_m, block_n) fp32 tiles (s, p, dp, ds), the fp32 dk/dv accumulators, the k, q, dO
    tiles and the v tile held when d_v is not split (input dtype), and the atomic dQ partial.
    On the 19 offline-compiled fp16/bf16 dK/dV variants every one costing <= 226 fit without
    spilling (one spilled 16 B at 160) and every one costing >= 268 spilled 176-720 B."""
    fused = dv_pad <= c.block_dv
    dv = c.block_dv if fused else min(c.block_dv, DP_CHUNK)
    elements = (4 * c.block_m * c.block_n + c.block_m * (d_pad + dv)
                + ((c.block_m * dv if fused else 0) + dv * c.block_n
                   + c.block_m * d_pad + d_pad * c.block_n) * elem_bytes // 4)
    if c.atomic_dq:  # the (d_pad, block_n) dQ partial and its atomic-add addressing
        elements += 8 * d_pad * c.block_n
    smem = c.num_stages * c.block_n * (d_pad + dv) * elem_bytes
    if not fused:  # the dV launch's program: s and p, the (block_m, dv_slice) dv accumulator, k, q, dO
        dv_program = (2 * c.block_m * c.block_n + c.block_m * c.dv_slice
                      + (c.dv_slice * c.block_n + c.block_m * d_pad + d_pad * c.block_n) * elem_bytes // 4)
        elements = max(elements, dv_program)
        smem = max(smem, c.num_stages * c.block_n * (d_pad + c.dv_slice) * elem_bytes)
    return elements / (32 * c.num_warps), smem


def _fit(configs, clamp, cost, budget, fallback, n, m, d_qk, d_v, elem_bytes, shared_bytes, prune, aligned,
         max_block_m=None):
    """Clamp each config to the shape, lower its pipeline depth until its tiles fit shared
    memory, drop it if it would still spill registers or overflow, and deduplicate."""
    shared_bytes = shared_bytes or _DEFAULT_SHARED_BYTES
    n, m, d_qk, d_v = int(n), int(m), int(d_qk), int(d_v)
    d_pad, dv_pad = pad_width(d_qk), pad_width(d_v)
    kept = []
    for c in configs:
        c = clamp(c, n, m, d_v, aligned)
        if prune:
            if max_block_m is not None and c.block_m > max_block_m:
                continue
            while c.num_stages > 1 and cost(c, d_pad, dv_pad, elem_bytes)[1] > shared_bytes:
                c = replace(c, num_stages=c.num_stages - 1)
            per_thread, smem = cost(c, d_pad, dv_pad, elem_bytes)
            if (budget is not None and per_thread > budget) or smem > shared_bytes:
                continue
        if c not in kept:
            kept.append(c)
    return kept or [clamp(fallback, n, m, d_v, aligned)]


def forward_candidates(configs, n, m, d_qk, d_v, elem_bytes, shared_bytes=None, prune=True, aligned=None):
    """The configurations worth timing for this shape: clamped to it, deduplicated, and pruned
    of those that would spill registers or overflow shared memory (`prune=False`: clamp only,
    for the interpreter, which has neither). `aligned`: whether the launch's strides are all 1
    or multiples of 16 (launch_aligned); None assumes contiguous inputs, aligned when N and M
    are multiples of 16. Never empty: FALLBACK_FORWARD when all are pruned."""
    aligned = _aligned(n, m) if aligned is None else bool(aligned)
    budget = _FORWARD_BUDGET_FP32 if elem_bytes == 4 else _FORWARD_BUDGET[aligned]
    return _fit(configs, _clamp_forward, _forward_cost, budget, FALLBACK_FORWARD,
                n, m, d_qk, d_v, elem_bytes, shared_bytes, prune, aligned,
                None if aligned else _RAGGED_MAX_BLOCK_M)


def backward_candidates(configs, n, m, d_qk, d_v, elem_bytes, shared_bytes=None, deterministic=False,
                        prune=True, aligned=None):
    """As forward_candidates, for the backward; `deterministic` keeps the two-pass ones only."""
    aligned = _aligned(n, m) if aligned is None else bool(aligned)
    configs = [c for c in configs if not (deterministic and c.atomic_dq)]
    budget = None if elem_bytes == 4 else _BACKWARD_BUDGET[aligned]
    return _fit(configs, _clamp_backward, _backward_cost, budget, FALLBACK_BACKWARD,
                n, m, d_qk, d_v, elem_bytes, shared_bytes, prune, aligned)


def _aligned(n, m) -> bool:
    return int(n) % 16 == 0 and int(m) % 16 == 0


def launch_aligned(*strides_and_offsets) -> bool:
    """Whether a launch is specialised as aligned: every stride and storage offset (in elements)
    of q, k and v is 1 or a multiple of 16, as Triton's JIT checks ints (divisibility by 16) and
    pointers (16-byte alignment; a torch allocation is always aligned)."""
    return all(int(x) == 1 or int(x) % 16 == 0 for x in strides_and_offsets)
