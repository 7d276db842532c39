"""Launch configurations of the attention kernels, kept as data, and their pruning.

Naming follows the kernels: N queries, M keys/values. The forward program owns `block_n`
queries and `block_dv` value channels and walks over the keys `block_m` at a time. The
backward dK/dV program owns `block_m` keys and walks over the queries `block_n` at a time; the
two-pass dQ program owns `block_n_dq` queries and walks over the keys `block_m_dq` at a time.

Provenance: NOT YET MEASURED on this project's shapes (the session that wrote these kernels had
no GPU). The entries start from the block shapes of Triton's fused-attention tutorial for
Hopper (fwd 128x64, bwd 32x128 / 128x32, 4-8 warps, 3-5 stages) and add the variants that the
small GAN widths make plausible: d_qk <= 32 makes QK^T cheap, so wider key tiles and smaller
value splits are worth trying. The GPU session should time every entry on the gan_shapes sites
(autotuning prints nothing; `fastattn.kernels.autotune.tuned_configs()` shows what won) and
drop the ones that never win, recording the numbers here.
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
    "INTERPRETER_FORWARD",
    "INTERPRETER_BACKWARD",
    "pad_width",
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


FORWARD_CONFIGS: tuple[ForwardConfig, ...] = (
    ForwardConfig(128, 64, 128, num_warps=8, num_stages=3),
    ForwardConfig(128, 64, 128, num_warps=4, num_stages=3),
    ForwardConfig(128, 128, 128, num_warps=8, num_stages=2),
    ForwardConfig(64, 64, 128, num_warps=4, num_stages=3),
    ForwardConfig(64, 128, 64, num_warps=4, num_stages=3),
    ForwardConfig(128, 32, 256, num_warps=8, num_stages=3),
)

BACKWARD_CONFIGS: tuple[BackwardConfig, ...] = (
    BackwardConfig(64, 64, 64, 64, 128, atomic_dq=True, num_warps=4, num_stages=2),
    BackwardConfig(64, 128, 128, 32, 128, atomic_dq=True, num_warps=8, num_stages=2),
    BackwardConfig(32, 128, 128, 32, 128, atomic_dq=True, num_warps=4, num_stages=3),
    BackwardConfig(128, 64, 128, 64, 128, atomic_dq=True, num_warps=8, num_stages=2),
    BackwardConfig(64, 64, 64, 64, 128, atomic_dq=True, num_warps=8, num_stages=3),
    BackwardConfig(32, 64, 64, 64, 128, atomic_dq=True, num_warps=4, num_stages=3),
    BackwardConfig(64, 64, 64, 64, 128, atomic_dq=False, num_warps=4, num_stages=2),
    BackwardConfig(32, 64, 64, 64, 128, atomic_dq=False, num_warps=4, num_stages=3),
    BackwardConfig(32, 128, 128, 32, 128, atomic_dq=False, num_warps=4, num_stages=3),
    BackwardConfig(64, 128, 128, 64, 256, atomic_dq=False, num_warps=8, num_stages=2),
)

# The fixed configuration (FASTATTN_TRITON_CONFIG=fixed, or torch deterministic algorithms on):
# no autotuning and a two-pass backward, so repeated runs give bit-identical results.
FIXED_FORWARD = ForwardConfig(64, 64, 128, num_warps=4, num_stages=2)
FIXED_BACKWARD = BackwardConfig(32, 64, 64, 64, 128, atomic_dq=False, num_warps=4, num_stages=2)

# Under TRITON_INTERPRET=1 every program runs in numpy: the smallest tiles tl.dot accepts keep
# the CI tests fast, and block_dv=64 makes the tests' d_v in {96, 300} take the split paths.
INTERPRETER_FORWARD = ForwardConfig(16, 16, 64, num_warps=1, num_stages=1)
INTERPRETER_BACKWARD = BackwardConfig(16, 16, 16, 16, 64, atomic_dq=False, num_warps=1, num_stages=1)

# When pruning leaves nothing (d_qk near 256 with wide values): small tiles that always fit.
FALLBACK_FORWARD = ForwardConfig(32, 32, 64, num_warps=4, num_stages=1)
FALLBACK_BACKWARD = BackwardConfig(32, 32, 32, 32, 64, atomic_dq=False, num_warps=4, num_stages=1)

# Budgets of the pruning rules below: fp32 accumulator/tile elements per thread (a thread has
# at most 255 registers, and the loads, pointers and softmax state need the rest), and bytes
# of shared memory when the device does not report its own limit (Ampere consumer parts).
_MAX_FP32_PER_THREAD = 160
_DEFAULT_SHARED_BYTES = 99 * 1024


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def pad_width(width: int) -> int:
    """A channel width padded to a power of two >= 16 (tl.dot's smallest operand side)."""
    return max(16, _pow2(int(width)))


def _clamp(block: int, length: int) -> int:
    """No wider than the (padded) length it tiles: larger tiles only add masked work."""
    return max(16, min(block, _pow2(length)))


def _clamp_forward(c, n, m, d_v):
    return replace(c, block_n=_clamp(c.block_n, n), block_m=_clamp(c.block_m, m),
                   block_dv=min(pad_width(c.block_dv), pad_width(d_v)))


def _clamp_backward(c, n, m, d_v):
    return replace(c, block_m=_clamp(c.block_m, m), block_n=_clamp(c.block_n, n),
                   block_n_dq=_clamp(c.block_n_dq, n), block_m_dq=_clamp(c.block_m_dq, m),
                   block_dv=min(pad_width(c.block_dv), pad_width(d_v)))


def _forward_cost(c, d_pad, dv_pad, elem_bytes):
    """(fp32 values live per thread, shared-memory bytes) of a forward program."""
    live = c.block_n * (c.block_dv + c.block_m) + c.block_n * d_pad * elem_bytes // 4  # acc, logits, q
    smem = c.num_stages * c.block_m * (d_pad + c.block_dv) * elem_bytes + c.block_n * d_pad * elem_bytes
    return live / (32 * c.num_warps), smem


def _backward_cost(c, d_pad, dv_pad, elem_bytes):
    """As _forward_cost, for the dK/dV program (the larger of the backward's programs)."""
    fused = dv_pad <= c.block_dv  # whole d_v in one dK/dV program
    # fp32 dk and dv accumulators, the v tile held when fused (in the input dtype), the k
    # tile, and two live (block_m, block_n) fp32 tiles (p overwrites s, ds overwrites dp)
    v_tile = c.block_dv * elem_bytes // 4 if fused else 0
    live = c.block_m * (d_pad + c.block_dv + v_tile + 2 * c.block_n + d_pad * elem_bytes // 4)
    smem = c.num_stages * c.block_n * (d_pad + c.block_dv) * elem_bytes
    return live / (32 * c.num_warps), smem


def _fit(configs, clamp, cost, fallback, n, m, d_qk, d_v, elem_bytes, shared_bytes, prune):
    """Clamp each config to the shape, lower its pipeline depth until its tiles fit shared
    memory, drop it if it would still spill registers or overflow, and deduplicate."""
    shared_bytes = shared_bytes or _DEFAULT_SHARED_BYTES
    n, m, d_qk, d_v = int(n), int(m), int(d_qk), int(d_v)
    d_pad, dv_pad = pad_width(d_qk), pad_width(d_v)
    kept = []
    for c in configs:
        c = clamp(c, n, m, d_v)
        if prune:
            while c.num_stages > 1 and cost(c, d_pad, dv_pad, elem_bytes)[1] > shared_bytes:
                c = replace(c, num_stages=c.num_stages - 1)
            per_thread, smem = cost(c, d_pad, dv_pad, elem_bytes)
            if per_thread > _MAX_FP32_PER_THREAD or smem > shared_bytes:
                continue
        if c not in kept:
            kept.append(c)
    return kept or [clamp(fallback, n, m, d_v)]


def forward_candidates(configs, n, m, d_qk, d_v, elem_bytes, shared_bytes=None, prune=True):
    """The configurations worth timing for this shape: clamped to it, deduplicated, and pruned
    of those that would spill registers or overflow shared memory (`prune=False`: clamp only,
    for the interpreter, which has neither). Never empty: FALLBACK_FORWARD when all are pruned."""
    return _fit(configs, _clamp_forward, _forward_cost, FALLBACK_FORWARD,
                n, m, d_qk, d_v, elem_bytes, shared_bytes, prune)


def backward_candidates(configs, n, m, d_qk, d_v, elem_bytes, shared_bytes=None, deterministic=False,
                        prune=True):
    """As forward_candidates, for the backward; `deterministic` keeps the two-pass ones only."""
    configs = [c for c in configs if not (deterministic and c.atomic_dq)]
    return _fit(configs, _clamp_backward, _backward_cost, FALLBACK_BACKWARD,
                n, m, d_qk, d_v, elem_bytes, shared_bytes, prune)
