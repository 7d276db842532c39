"""THE naive math, exactly as attention-GAN layers compute it: bmm -> softmax -> bmm.

This is the one reference implementation. Tests and benchmarks import it; nothing copies it.
It materialises the full (B, N, M) attention matrix in the inputs' dtype, which is what the
original SAGAN / BigGAN / StudioGAN layers do (and why they overflow in fp16 and run out of
memory at high resolution).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["reference_attention", "reference_attention_map", "default_scale", "accumulation_dtype"]


def default_scale(d_qk: int) -> float:
    """The logit scale that `scale=None` means: 1/sqrt(d_qk), as in
    torch.nn.functional.scaled_dot_product_attention (1.0 when there are no channels)."""
    return 1.0 / math.sqrt(d_qk) if d_qk > 0 else 1.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fastattn keeps logits, softmax statistics and sums in for inputs of `dtype`:
    float64 for float64, float32 for everything narrower (so fp16 logits cannot overflow)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_attention_map(q: Tensor, k: Tensor, scale: float | None = 1.0) -> Tensor:
    """softmax_j(scale * q[:, :, i] . k[:, :, j]) as a (B, N, M) tensor, in q's dtype."""
    logits = torch.bmm(q.transpose(1, 2), k)  # (B, N, M)
    if scale is None:
        scale = default_scale(q.shape[1])
    if scale != 1.0:
        logits = logits * scale
    return torch.softmax(logits, dim=-1)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = 1.0, return_lse: bool = False
):
    """out[b, :, i] = sum_j v[b, :, j] * softmax_j(scale * q[b, :, i] . k[b, :, j]).

    q: (B, d_qk, N), k: (B, d_qk, M), v: (B, d_v, M) -> out: (B, d_v, N).
    With return_lse, also the per-query log-sum-exp of the scaled logits, (B, N) in fp32
    (fp64 for fp64 inputs), computed from the same logits in at least fp32.
    """
    logits = torch.bmm(q.transpose(1, 2), k)
    if scale is None:
        scale = default_scale(q.shape[1])
    if scale != 1.0:
        logits = logits * scale
    attn = torch.softmax(logits, dim=-1)
    out = torch.bmm(v, attn.transpose(1, 2))
    if not return_lse:
        return out
    lse = torch.logsumexp(logits.to(accumulation_dtype(logits.dtype)), dim=-1)
    return out, lse
