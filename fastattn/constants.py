"""Every constant that is a measured choice, in one place, with where it came from."""
from __future__ import annotations

import torch

# --- torch backend -------------------------------------------------------------------------
# Bytes of fp32 working memory per (B x chunk x M) logits buffer in the chunked torch backend.
# The backward holds two such buffers (probabilities and their gradient), so working memory is
# about 2x this, whatever N is. Measured on the 2-core CPU dev machine (benchmarks/tune_chunk.py):
# 4-8 MiB keeps the buffer in cache and is fastest at the BigGAN-256 and unpooled-stress sites;
# see the table printed by that script.
TORCH_CHUNK_BYTES = 8 * 2**20

# --- accuracy ------------------------------------------------------------------------------
# Tolerances for comparing a result in `dtype` against an fp64 reference of the same inputs:
# |got - ref| <= atol + rtol * |ref|. Chosen from the error plain PyTorch itself makes in that
# dtype on the gan_shapes sites with unit-variance inputs (tests/test_parity.py prints it):
# fp32 ~1e-6, fp16 ~1e-3, bf16 ~8e-3 relative. The margins cover sums over M up to 16384.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
    torch.float32: {"atol": 2e-5, "rtol": 2e-4},
    torch.float16: {"atol": 3e-3, "rtol": 1e-2},
    torch.bfloat16: {"atol": 2e-2, "rtol": 5e-2},
}

# Flash-attention's accuracy rule (../shared/STYLE.md): a kernel's error against an fp64
# reference may be at most this many times plain PyTorch's error in the same dtype, plus the
# absolute floor below (which keeps the rule meaningful when PyTorch's error is ~0).
ERROR_RATIO_OUT = 2.0
ERROR_RATIO_GRAD = 3.0
ERROR_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}

# --- triton backend ------------------------------------------------------------------------
# The Triton kernels' launch configurations (tile sizes, warps, pipeline stages) and the rules
# that prune them are a table of their own, kernels/configs.py (fastattn.kernels.configs), with
# their provenance there: their register fit was measured by compiling for sm_90/sm_80 without a
# GPU (tests/test_triton_compile.py); their timing awaits a GPU run. The Triton backend adds no
# tolerance: its tests use the accuracy rule above.
