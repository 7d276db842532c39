"""Measure the torch backend's per-size strategy thresholds (fastattn/constants.py):
TORCH_KEEP_PROBS_BYTES (kept probabilities vs chunked recomputation, by (B, N, M) fp32 bytes) and
SDPA_AUTO_MIN_HEAD_DIM (PyTorch's CPU flash kernel vs the torch backend, by d_qk = d_v).
Providers interleaved in one process, medians of REPEATS; prints ratios (time / time of chunked).
    python benchmarks/tune_strategy.py [threads]
"""
import statistics
import sys
import time

import torch

from fastattn.backends.sdpa import sdpa_attention
from fastattn.backends.torch_chunked import chunked_attention
from fastattn.backends.torch_small import kept_probs_attention, kept_probs_out

REPEATS = 7


def timed(fns, direction, q, k, v, g, scale):
    def run(fn):
        if direction == "fwd":
            with torch.no_grad():
                fn(q, k, v, scale)
        else:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = fn(*leaves, scale)
            torch.autograd.grad(out, leaves, g)
    inner = max(1, int(4e6 // (q.shape[0] * q.shape[2] * k.shape[2])))
    times = {name: [] for name in fns}
    for fn in fns.values():
        run(fn)
    for _ in range(REPEATS):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                run(fn)
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    chunked = lambda q, k, v, s: chunked_attention(q, k, v, s)[0]
    print("kept probabilities / chunked (fp32), by (B, N, M) bytes:")
    for B, d_qk, N, M, d_v in [(1, 48, 256, 64, 192), (16, 48, 256, 64, 192), (64, 48, 256, 64, 192),
                               (64, 16, 256, 64, 64), (1, 8, 1024, 1024, 64), (2, 8, 1024, 1024, 64),
                               (4, 8, 1024, 1024, 64), (8, 8, 1024, 1024, 64), (1, 24, 4096, 1024, 96),
                               (256, 48, 256, 64, 192)]:
        q, k, v, g = torch.randn(B, d_qk, N), torch.randn(B, d_qk, M), torch.randn(B, d_v, M), torch.randn(B, d_v, N)
        mib = B * N * M * 4 / 2**20
        for direction in ("fwd", "fwd+bwd"):
            kept = (lambda q, k, v, s: kept_probs_out(q, k, v, s)) if direction == "fwd" else \
                (lambda q, k, v, s: kept_probs_attention(q, k, v, s, need_lse=False)[0])
            t = timed({"chunked": chunked, "kept": kept}, direction, q, k, v, g, 1.0)
            print(f"  B={B} d_qk={d_qk} N={N} M={M} d_v={d_v} ({mib:.1f} MiB) {direction}: "
                  f"chunked {t['chunked'] * 1e3:.2f} ms, kept/chunked {t['kept'] / t['chunked']:.2f}", flush=True)
    print("sdpa (CPU flash) / chunked, N = M = 1024, B = 1, scale d**-0.5:")
    for d in (32, 64, 128, 256, 512):
        q, k, v, g = (torch.randn(1, d, 1024) for _ in range(4))
        for direction in ("fwd", "fwd+bwd"):
            t = timed({"chunked": chunked, "sdpa": lambda q, k, v, s: sdpa_attention(q, k, v, s)[0]},
                      direction, q, k, v, g, d ** -0.5)
            print(f"  d={d} {direction}: chunked {t['chunked'] * 1e3:.2f} ms, sdpa/chunked {t['sdpa'] / t['chunked']:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
