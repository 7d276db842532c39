"""Every constant that is a measured choice, in one place, with where it came from."""
from __future__ import annotations

import torch

# --- torch backend -------------------------------------------------------------------------
# Bytes of fp32 working memory per (B x chunk x M) logits buffer in the chunked torch backend.
# The backward holds two such buffers (probabilities and their gradient), so working memory is
# about 2x this, whatever N is. Measured with the first benchmarks/tune_chunk.py (budgets one after
# another, not interleaved) on the 2-core AMD EPYC dev machine (2 MiB L2 per core, 32 MiB L3;
# torch 2.13.0+cpu, 2 threads, quiet), median fp32
# forward+backward, B=1:       budget MiB:  1      2      4      8      16     32     64
#   biggan256_G128 (N=16384, M=4096)        0.549  0.529  0.504  0.477  0.485  0.610  0.624 s
#   stress_unpooled128 (N=M=16384)          1.924  1.711  1.690  1.610  2.396  2.237  1.885 s
# 8 MiB is fastest at both. Not measured on CUDA, where automatic choice takes the triton backend.
# Re-measured with the (samples x rows) blocks of backends/torch_chunked.py at 2 threads (quiet,
# load average below 1, 2026-12-02; interleaved rounds, medians of 7), fwd+bwd fastattn / naive,
# block budget 2 / 4 / 8 MiB: biggan128_G B=6 0.71 / 0.66 / 0.64; studiogan64_G B=119 0.85 / 0.83 /
# 0.83; sagan64_unpooled_G B=8 0.62 / 0.60 / 0.59: 8 MiB stays.
# Re-measured with `python benchmarks/tune_chunk.py --threads 2` (quiet, 2026-12-03, this host's
# 1 MiB L2 per core; results/cpu/tune_chunk_budget_2threads.txt), 1 / 2 / 4 / 8 MiB, time / naive:
# biggan128_G B=6 0.73 / 0.65 / 0.56 / 0.54, biggan128_D B=12 0.46 / 0.45 / 0.45 / 0.45,
# sagan64_unpooled_G B=8 0.77 / 0.79 / 0.76 / 0.71; biggan256_G128 B=1 read 0.42 / 0.41 / 0.39 /
# 0.53 in that run and 0.41 / 0.36 / 0.36 / 0.34 in a rerun of 11 rounds: two threads on this
# 2-core VM spread ±8-25%, and no budget is faster than 8 MiB beyond that noise; 8 MiB stays.
TORCH_CHUNK_BYTES = 8 * 2**20
# With one torch thread (fastattn bench's CPU default, and any job pinned to one core) the best
# budget is smaller: one core's 2 MiB L2. Measured (benchmarks/tune_chunk.py's method, interleaved
# with naive and SDPA in rounds, as benchmarks/tune_chunk.py now does; 1 thread, shared 2-core AMD
# EPYC VM, load average 2-2.6, torch 2.13.0+cpu, 2026-12-02), fp32 fwd+bwd, fastattn / naive time:
#                                     budget MiB:  1     2     4     8     (SDPA / naive)
#   biggan128_G (4096x1024, d 24/96) B=1            0.51  0.54  0.57  0.61  (0.67)
#   biggan128_G B=6                                 0.59  0.56  0.54  0.55  (0.77)
#   biggan128_D (4096x1024, d 12/48) B=12           0.47  0.40  0.41  0.42  (0.78)
#   biggan256_G128 (16384x4096, d 24/96) B=1        0.44  0.42  0.42  0.51  (0.73)
# 2 MiB is best or within 0.03 of best at every one; at 2 threads 8 MiB stays (table above).
# Re-measured with the committed sweep, `python benchmarks/tune_chunk.py --mode budget` (1 thread,
# medians of 7 interleaved rounds, 2-core AMD EPYC VM with 1 MiB L2 per core, quiet, load average
# 0.6-1.0, torch 2.13.0+cpu, 2026-12-03; benchmarks/results/cpu/tune_chunk_budget_1thread.txt):
#                                     budget MiB:  1     2     4     8     (SDPA / naive)
#   biggan128_G B=1                                 0.51  0.50  0.53  0.57  (0.84)
#   biggan128_G B=6                                 0.50  0.49  0.53  0.51  (0.78)
#   biggan128_D B=12                                0.29  0.29  0.29  0.31  (0.70)
#   biggan256_G128 B=1                              0.32  0.33  0.33  0.33  (0.51)
#   sagan64_unpooled_G (1024x1024, d 8/64) B=8      0.44  0.44  0.44  0.45  (0.84)
# (spreads ±2-10%): 1-4 MiB tie within the noise on this host's smaller L2, 8 MiB is the slowest
# or tied at every site; 2 MiB stays.
TORCH_CHUNK_BYTES_ONE_THREAD = 2 * 2**20
# ... and a block never has fewer query rows than this when it can have them: with a large batch,
# all samples times a few rows (studiogan64_G B=119, M=256: 17 rows in 2 MiB) makes each matmul too
# small, so a block then takes this many rows of fewer samples (backends/torch_chunked.block_shape;
# a budget smaller than one sample's TORCH_CHUNK_MIN_ROWS rows still gives fewer rows, so tests can
# force many blocks). Measured side by side (1 thread, interleaved rounds, medians of 5-7; shared
# 2-core AMD EPYC VM, load average about 1, torch 2.13.0+cpu, 2026-12-02; /tmp script of the kind
# of benchmarks/tune_strategy.py), fastattn / naive time, fwd and fwd+bwd, for the previous chunking
# (all samples x rows, min 128 rows, exp(s - m) / l from saved row statistics) -> blocks of
# (samples x 128+ rows) with a fused softmax recomputed in the backward (this design), 2 MiB:
#   biggan128_G B=6 (4096x1024, d 24/96)    0.57 -> 0.48,  0.52 -> 0.45
#   sagan64_unpooled_G B=8 (1024x1024, 8/64) 0.54 -> 0.41,  0.49 -> 0.38
#   sagan64_unpooled_G B=42                 0.61 -> 0.42,  0.58 -> 0.45
#   studiogan64_G B=119 (1024x256, 20/80)   0.85 -> 0.54,  0.75 -> 0.53
#   sagan128_G B=64 (1024x256, 32/128)      0.80 -> 0.65,  0.80 -> 0.76
#   biggandeep256 B=2 (4096x1024, 64/256)   0.75 -> 0.71,  0.71 -> 0.66
#   biggan256_G128 B=1 (16384x4096, 24/96)  0.58 -> 0.54,  0.47 -> 0.46
# Minimum rows 32 instead of 128: 0.02-0.25 worse at every point; budgets 1 and 4 MiB: within the
# spread of 2 MiB at the pooled sites, 4 MiB worse at studiogan64_G and sagan128_G (0.62-0.79).
# Re-measured with `python benchmarks/tune_chunk.py --mode rows` (1 thread, 2 MiB blocks, medians
# of 7 interleaved rounds, quiet, 2026-12-03; results/cpu/tune_chunk_rows_1thread.txt), fwd+bwd,
# fastattn / naive time, min rows 32 / 128 / 256 (SDPA / naive):
#   studiogan64_G B=119 0.51 / 0.47 / 0.48 (0.74); sagan128_G B=64 0.81 / 0.61 / 0.62 (0.81);
#   sagan64_unpooled_G B=42 0.34 / 0.30 / 0.32 (0.64): 128 stays.
TORCH_CHUNK_MIN_ROWS = 128

# Bytes per (B x chunk x M) buffer in the double backward (backends/chunked_grad.py), which holds
# four such buffers. Re-measured on a quiet machine (2-core AMD EPYC VM, load average 0.8-1.0,
# torch 2.13.0+cpu, 2026-12-02, /tmp script: forward, backward with create_graph, backward of
# |dq|^2 + |dk|^2 + |dv|^2, budgets interleaved in rotating rounds, medians of 8-12), time / naive:
#   R1 site (B=4, d_qk=16, N=4096, M=1024, d_v=64), 1 thread: 2 MiB 0.24, 4 MiB 0.24, 8 MiB 0.28
#                                                    2 threads: 2 MiB 0.24, 4 MiB 0.25, 8 MiB 0.27
#   biggan128_D-like (12, 12, 4096, 1024, 48), 1 thread: 0.22 at 2, 4 and 8 MiB
#   sagan64-like (16, 8, 1024, 1024, 64), 1 thread: 2 MiB 0.26, 4 MiB 0.26, 8 MiB 0.28
# 2 and 4 MiB tie and beat 8 MiB by up to 12%; 4 MiB keeps more rows per chunk at large B.
# (The earlier 8 MiB came from a run at load 5-7 where no budget was clearly faster.)
# Re-measured with `python benchmarks/tune_chunk.py --mode double` (1 thread, medians of 7
# interleaved rounds, quiet, 2026-12-03; results/cpu/tune_chunk_double_1thread.txt), time / naive
# at 2 / 4 / 8 MiB: R1 site 0.25 / 0.24 / 0.24; sagan64_unpooled_G B=16 0.30 / 0.30 / 0.30;
# biggan128_D B=12 0.15 / 0.15 / 0.16 (spreads ±3-6%): a tie on this host; 4 MiB stays.
DOUBLE_BACKWARD_CHUNK_BYTES = 4 * 2**20

# Largest (B, N, M) probability matrix (bytes, in the accumulation dtype) that the torch backend
# keeps for the backward instead of recomputing it chunk by chunk (fastattn/backends/torch_small.py).
# Below it the naive layer's arithmetic as one node (fused softmax, fused softmax backward, no
# recomputation, no lse pass unless return_lse) beats the chunked path, whose recomputation and
# per-chunk work dominate at small sizes. A fixed budget: memory stays bounded, never ~N x M.
# Measured with benchmarks/tune_strategy.py (1 thread, shared 2-core AMD EPYC VM, load average 6-9,
# torch 2.13.0+cpu, 2026-11-22), kept / chunked time, fwd and fwd+bwd:
#   CIFAR G (256x64, d 48/192) B=1 0.1 MiB: 0.48, 0.65   B=16 1 MiB: 0.90, 0.75   B=64 4 MiB: 0.75, -
#   CIFAR D (256x64, d 16/64) B=64 4 MiB: 0.90, 0.77
#   SAGAN64 (1024x1024, d 8/64) B=1 4 MiB: 0.69, 0.77   B=2 8 MiB: 0.85, 0.75   B=4 16 MiB: 1.16, 1.43
#                                B=8 32 MiB: 2.03, 1.62
#   BigGAN-128 G (4096x1024) B=1 16 MiB: 2.23, 1.06
#   CIFAR G B=256 16 MiB: 0.44, 0.56
# Keeping wins up to 8 MiB everywhere and loses from 16 MiB, except where each sample's matrix is
# tiny (CIFAR's 256 x 64 = 64 KiB: the chunked path then splits many tiny matmuls): there it wins
# up to 16 MiB (B = 256), hence the second, per-sample rule.
# An inference forward (no graph) follows the same rule: three whole ops (bmm, softmax in place on
# the logits, bmm) where the matrix fits, blocks elsewhere (TorchBackend.out_runner). Measured side
# by side with benchmarks/tune_strategy.py 1 inference (1 thread, quiet 2-core AMD EPYC VM, load
# average 0.8, torch 2.13.0+cpu, 2026-12-02; providers interleaved in rotating order, medians of
# 31), fwd time / naive time, whole / blocks of 2 MiB:
#   sagan64_unpooled_G (1024x1024, d 8/64) B=1 4 MiB: 0.98 / 1.07   B=2 8 MiB: 0.97 / 0.96
#                                          B=4 16 MiB: 0.66 / 0.69  B=8 32 MiB: 0.70 / 0.42
#   sagan128_G (1024x256, d 32/128) B=4 4 MiB: 0.96 / 1.04   B=8 8 MiB: 0.98 / 1.02   B=16 16 MiB: 0.98 / 1.08
#   studiogan64_G (1024x256, d 20/80) B=8 8 MiB: 0.97 / 0.95
#   biggan128_G (4096x1024, d 24/96) B=1 16 MiB: 0.97 / 0.82   B=2 32 MiB: 0.73 / 0.45
#   cifar_G (256x64, d 48/192) B=64 4 MiB: 1.00 / 1.25   B=256 16 MiB: 0.88 / 0.91
# Whole is never slower than naive and wins or ties up to 8 MiB (and to 16 MiB of 64 KiB samples);
# blocks win from 16-32 MiB of large samples. The earlier rule (whole only within one 2 MiB block)
# measured sagan64 B=1-2 at 0.94-0.89 in blocks vs 1.03 whole on 2026-12-02 with an out-of-place
# softmax, whose second (B, N, M) buffer the in-place softmax removed.
TORCH_KEEP_PROBS_BYTES = 8 * 2**20
TORCH_KEEP_PROBS_SMALL_SAMPLE_BYTES = 64 * 2**10
TORCH_KEEP_PROBS_SMALL_SAMPLE_MAX_BYTES = 16 * 2**20
# Largest (B, N, M) probability matrix (bytes), in all and per sample, for which a forward that
# needs a graph (training, no return_lse) runs torch's own autograd of bmm -> softmax -> bmm in
# token-major layout (logits as (B, M, N) = k^T q, softmax over dim 1, out = v @ P: no transposed
# view, so the softmax backward gets a contiguous gradient, which the naive layer's does not)
# instead of the kept-probabilities autograd.Function, whose Python backward costs ~40-60 us per
# call. Both save only the probabilities. Measured with benchmarks/tune_strategy.py 1 training
# (1 thread, quiet 2-core AMD EPYC VM, load average 0.7, torch 2.13.0+cpu, 2026-12-03; providers
# interleaved in rotating order, medians of 31), fwd+bwd time / naive time, plain / Function:
#   cifar_G (256x64, d 48/192, 64 KiB a sample) B=1: 0.97 / 1.11   B=2: 0.96 / 1.07   B=4: 0.93 / 1.05
#                         B=8 512 KiB: 0.94 / 0.96   B=16 1 MiB: 0.96 / 0.98   B=32: 0.99 / 0.95   B=64: 1.02 / 0.97
#   CIFAR D (256x64, d 16/64) B=1: 0.81 / 1.10   B=4: 0.89 / 0.90   B=16: 0.92 / 0.92   B=64: 0.94 / 0.87
#   256x256 (d 8/32, 256 KiB a sample) B=1: 0.89 / 0.92   B=4 1 MiB: 0.93 / 0.85
#   512 KiB a sample: 512x256 B=1 0.80 / 0.73, B=2 0.80 / 0.72; 1024x128 B=1 0.76 / 0.68
#   1 MiB a sample: 512x512 0.84 / 0.75; 1024x256 d 8/32 0.79 / 0.63, d 32/128 0.86 / 0.84
#   sagan64 (1024x1024, 4 MiB) B=1: 0.82 / 0.65
# Plain autograd wins up to 512 KiB of samples of at most 256 KiB and is within 2% of the Function
# up to 1 MiB; the Function wins from 512 KiB a sample and at 1 MiB of 256 KiB samples. A second
# run the same day (load average 0.6-0.9): cifar_G B=1-4 0.94-0.96 / 1.03-1.12, B=8 0.97 / 0.94
# (the crossover: both below 1), B=16 0.96 / 0.96; CIFAR D B=1 0.82 / 1.17, B=4 0.85 / 0.99;
# 256x256 B=1 0.88 / 0.92, B=4 0.97 / 0.85; 512 KiB a sample 0.81-0.92 / 0.74-0.85.
# (The earlier rule, 128 KiB in query-major layout, came from a run at load average 1.7-2.2.)
TORCH_PLAIN_AUTOGRAD_BYTES = 512 * 2**10
TORCH_PLAIN_AUTOGRAD_SAMPLE_BYTES = 256 * 2**10

# --- sdpa backend (PyTorch's fused CPU flash kernel, fastattn/backends/sdpa.py) -----------------
# Automatic choice takes the sdpa backend (it needs d_qk == d_v) only from this head width and this
# many (query, key) pairs per sample up; below either the torch backend was measured faster.
# Measured on a quiet machine (1 thread, 2-core AMD EPYC VM, load average 0.2-0.7, torch 2.13.0+cpu,
# 2026-12-02, /tmp script: providers interleaved in rounds, medians of 3-7), B=1, one head, scale
# d**-0.5, time / naive time, torch backend vs sdpa backend (token-major copies, saved for the
# backward), fwd and fwd+bwd:
#   N=M=1024: d=64 1.00 vs 0.92, 0.54 vs 0.62;  d=128 1.02 vs 1.04, 0.79 vs 0.94
#             d=256 1.00 vs 1.08, 0.80 vs 1.05;  d=512 1.05 vs 1.16, 0.89 vs 1.15
#   N=M=2048, d=512: 0.91 vs 0.87, 1.01 vs 0.99
#   N=M=4096: d=256 0.75 vs 0.66, 0.85 vs 0.75;  d=512 (autoencoder_mid512) 0.84 vs 0.72, 0.99 vs 0.90
# (The previous threshold, d >= 512 at any size, came from a run under load average 7-9.)
SDPA_AUTO_MIN_HEAD_DIM = 256
SDPA_AUTO_MIN_PAIRS = 2048 * 2048

# --- accuracy ------------------------------------------------------------------------------
# Tolerances for comparing a result in `dtype` against an fp64 reference of the same inputs:
# |got - ref| <= atol + rtol * |ref|. Chosen from the error plain PyTorch itself makes in that
# dtype on the gan_shapes sites with unit-variance inputs (tests/backends/test_torch_chunked.py prints both errors):
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
# GPU (tests/backends/triton/test_triton_compile.py); their timing has not been measured on a GPU. The Triton backend adds no
# tolerance: its tests use the accuracy rule above.

# --- benchmarks (fastattn bench) ------------------------------------------------------------
# Fraction of the device's free memory (CUDA: free device memory; CPU: MemAvailable) that the
# naive path's (B, N, M) matrices may take when a preset scales a config's batch size down.
# Half leaves room for the inputs, the other providers' buffers and whatever else runs.
BENCH_MEMORY_FRACTION = 0.5
# CPU only: the `gan` preset also caps the batch so that one naive forward+backward is at most
# this many matmul FLOPs (~1-2 s on the 2-core dev machine, which sustains ~10-20 GFLOP/s in fp32
# bmm while shared), so the preset ends in minutes rather than hours.
BENCH_CPU_WORK_CAP_FLOP = 20 * 10**9
# No-overlap time bound per SM, by CUDA compute capability (the `% bound` column of fastattn
# bench): dense fp16/bf16 tensor-core FLOP per clock per SM and exp2 per clock per SM.
# Hopper (9.0): 989.4 TFLOP/s dense bf16 on H100 SXM = 132 SMs x 1.83 GHz x 4096.
# Ampere A100 (8.0): 312 TFLOP/s = 108 SMs x 1.41 GHz x 2048. Both: 16 MUFU exp2 per clock per SM.
# Other architectures get no bound (the column says "-") rather than a guessed one.
BOUND_FLOP_PER_CLOCK_PER_SM = {"9.0": 4096, "8.0": 2048}
BOUND_EXP2_PER_CLOCK_PER_SM = 16
# `fastattn bench --compare`: a case is significantly slower when its median grew by more than
# this factor AND its interquartile range no longer overlaps the old one (new q25 > old q75);
# the IQR condition carries each case's own measured noise, the ratio sets the smallest slowdown
# worth failing on. Measured with benchmarks/measure_noise.py (quick preset, unchanged code) on the
# 2-core AMD EPYC dev VM, idle, torch 2.13.0+cpu, 2026-11-21:
#   2 threads, 3 runs:               within-run q75/q25 p90 1.20; run-to-run median ratio p95 1.43, max 2.07
#   1 thread, 4 runs:                p90 1.27; p95 1.24, max 2.27
#   2 threads, --min-time 2, 4 runs: p90 1.23; p95 1.64, max 2.36
# i.e. millisecond-scale CPU cases shift bimodally by up to ~2.4x between identical runs with
# non-overlapping IQRs. 2.4 is the smallest ratio that flagged none of those comparisons, so on
# this CPU the gate catches only large regressions; (under load average 6-9 the max was 4.9.)
# Re-measure on a GPU, where timings are far steadier, and pass --regression-ratio there.
BENCH_REGRESSION_RATIO = 2.4
# A case is timed until its spread, (q75 - q25) / median, is at most BENCH_STABLE_SPREAD (after the
# minimum repeats and time), or until BENCH_MAX_TIME_FACTOR x --min-time has passed; a case still
# above it is flagged `unstable` in the table and JSON. 0.10: the quiet-machine within-run
# q75/q25 p90 above is 1.20 (spread ~0.2) at 2 threads, ~0.1 at 1 thread; flag what is worse.
BENCH_STABLE_SPREAD = 0.10
BENCH_MAX_TIME_FACTOR = 4
# Most timed repeats per case on a CPU (--repeats). The minimum time (0.5 s) is what decides how
# long a case is timed; this cap only keeps a sub-microsecond case finite. The earlier cap of 10
# ended a 0.1 ms case (cifar_G, B=1) after 1 ms of samples, well before its minimum time, and its
# ratios then moved by several percent between runs (quick preset fwd / naive 1.04-1.11 over three
# runs on 2026-12-02, quiet 2-core EPYC). 2000 repeats of a 0.1 ms call take 0.2 s.
BENCH_CPU_MAX_REPEATS = 2000
# Torch threads `fastattn bench` uses on a CPU unless --threads says otherwise. On the shared 2-core
# dev VM (load average 5-9 from other jobs, 2026-11-22), with 2 threads OpenMP's threads wait for
# each other at every op and millisecond cases became bimodal: CIFAR G (B=1) naive forward 3.6 ms at
# 2 threads vs 0.32 ms at 1 (0.085 ms on the quiet machine), sagan64 B=1 naive fwd 112 ms vs 8 ms.
# One thread gives stable, if slower, numbers on a machine shared with other work.
BENCH_CPU_THREADS = 1

# --- swap_attention probe (fastattn/swap/probe.py) ---------------------------------------------
# Before swapping a layer, its original forward and fastattn's run on random inputs of these
# (H, W) sizes (batch 2, the layer's C), in eval and in training mode, every call on its own fresh
# deep copy with the residual scalar (for captured layers: every one-element parameter that is 0)
# set to this value (not 0: the layer would be the identity; not 1: `o + x` would pass for
# `gamma * o + x`), each from RNG seed SWAP_PROBE_SEED (so spectral norms that update on every
# call advance alike on both, and a dropout in the original shows up as a difference; the
# caller's RNG state is restored after). Captured layers are also traced on the first size.
# The first size is even so every family runs it; the odd one checks the pooling rule of the
# families whose originals accept odd sizes. Chosen, not measured: a few dozen pixels still tell
# every known variant apart, and the probe costs 6-12 ms per layer of the tests' families at C=64
# on the 2-core CPU dev machine (about half of it the training-mode pass and its two copies)
# (tests/swap/test_swap_families.py: old heykeetae forks, scaled logits, ceil vs floor pooling, a dropout on
# the attention map in training).
SWAP_PROBE_SIZES = ((6, 4), (5, 3))
SWAP_PROBE_SCALAR = 0.75
SWAP_PROBE_SEED = 0

# --- reference GAN (fastattn.models, tests/models/test_gan_parity.py) ----------------------------
# Largest difference allowed between the losses (and mean D logits) of a naive-layer run and a
# fastattn run of the reference GAN from the same weights, batches and noise, over the first 6
# training steps, as |a - b| / max(|a|, |b|, 1) (relative, absolute below 1: hinge losses pass
# through 0). Setup: 16x16 conditional G with unpooled attention at 16x16 (N = M = 256), D with
# pooled attention at 8x8, ch 8, batch 8, every gamma set to 0.5; torch chunked backend.
# Measured on the 2-core CPU dev machine (torch 2.13.0+cpu), seeds 0-4: fp64 worst 9e-16,
# fp32 worst 9.5e-7 (errors grow about 2x over 12 steps as the runs drift apart). The fp32
# tolerance is 10x the worst measured; fp64 keeps the 1e-9.
GAN_PARITY_FP64_RTOL = 1e-9
GAN_PARITY_FP32_RTOL = 1e-5

# --- swapped layers (fastattn/swap/) ------------------------------------------------------------
# A layer captured by computation runs its own forward under a TorchFunctionMode that sees every
# torch call it makes (convs, norms, spectral-norm hooks): a few microseconds per op, a few hundred
# per call of a CIFAR-sized layer. Where the core's (B', N, M) matrix is at most this many bytes
# (on the CPU, backend automatic), fastattn's torch backend computes the naive arithmetic itself
# (kept probabilities), so capturing only adds that cost: such calls run the layer's forward as
# written (swap/forward.py, direct_is_faster); SWAP_DIRECT_MAX_BYTES_GRAD applies where autograd
# records the call (grad enabled), whose captured path gains more from fastattn's backward.
# Measured with `python benchmarks/swap_overhead.py --min-time 0.3` (1 thread, 2-core AMD EPYC VM,
# quiet, 2026-12-03; results/cpu/swap_overhead_2mib.md): six corpus layers (SN + avg-pooled,
# BigGAN y-ignored, channels-last Linear, GroupNorm AttnBlock, 4-head einsum, SDPA heads) at B = 1
# and 8, 8x8 to 32x32; captured time / the layer as written, by the core's fp32 matrix per call:
#   <= 1 MiB:  fwd 1.25-2.89, fwd+bwd 1.04-1.76 (sdpa_heads at 256-512 KiB: 0.95-1.03)
#      2 MiB:  fwd 1.12-1.20, fwd+bwd 0.98-1.09   (linear_channels_last, groupnorm_attnblock, B=8 16x16)
#      4 MiB:  fwd 0.77-1.08, fwd+bwd 0.81-1.02   (the same at B=1 32x32, sdpa_heads B=8 16x16)
#      8 MiB:  fwd 0.68-0.94, fwd+bwd 0.69-0.84   (four layers); 16-128 MiB: 0.34-0.87
# So calls without a graph run as written up to 4 MiB, calls with one up to 2 MiB. A forward that
# makes its map real anyway (returns it, or its mean over heads) ran 1.16-3.40x captured without a
# graph at every size (returns_map_at, multihead_pooled_returns_map, `swap_overhead.py --layer ...`,
# results/cpu/swap_overhead_maps.md): such calls run as written at any size (0.97-1.03x after, one
# case 1.08 that reran at 1.01-1.02); with a graph they stay captured above 2 MiB (0.58-1.02x).
SWAP_DIRECT_MAX_BYTES = 4 * 2**20
SWAP_DIRECT_MAX_BYTES_GRAD = 2 * 2**20

# --- fastattn.verify (fastattn/verify/) -------------------------------------------------------
# `fastattn verify` times the two models (original and swapped, per dtype, fwd and fwd+bwd)
# interleaved, as `fastattn bench` does (fastattn.bench.measure.time_interleaved): one warm-up, then
# rounds of one call each until each has spent VERIFY_MIN_TIME_S, within [VERIFY_MIN_REPEATS,
# VERIFY_MAX_REPEATS] rounds (more while a spread stays over BENCH_STABLE_SPREAD). Chosen, not
# measured: verify reports time side by side for a CI log, not a benchmark; a tenth of a second
# per direction keeps a run of a small model within seconds. Use `fastattn bench` for figures.
VERIFY_MIN_TIME_S = 0.1
VERIFY_MIN_REPEATS = 3
VERIFY_MAX_REPEATS = 100
# The seed of every run's RNG (training-mode dropout, the gradient cotangents, inputs made by a
# callable): every run of a check starts from it, so the original and the swapped model see the
# same random numbers.
VERIFY_SEED = 0
