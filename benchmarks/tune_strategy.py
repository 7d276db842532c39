"""Measure the torch backend's per-size strategy thresholds (fastattn/constants.py):
TORCH_KEEP_PROBS_BYTES (kept probabilities vs chunked recomputation, by (B, N, M) fp32 bytes) and
SDPA_AUTO_MIN_HEAD_DIM (PyTorch's CPU flash kernel vs the torch backend, by d_qk = d_v), and
the inference rule (TorchBackend.out_runner: an inference forward as three whole ops or in blocks).
Providers interleaved in one process, medians of REPEATS; prints ratios (time / time of chunked,
or time / naive time for the inference rule).
The training rule (TorchBackend.out_runner: a forward that needs a graph through torch's own
autograd in token-major layout, or the kept-probabilities autograd.Function) is measured by the
`training` mode: fwd+bwd time / naive fwd+bwd time, interleaved, medians.
The `overhead` mode times, in the bench's own interleaved timing (fastattn.bench.measure), the
naive layer, the torch backend's ops alone and `spatial_attention` at cifar_G B = 1-8: what the
per-call Python in front of the ops costs.
    python benchmarks/tune_strategy.py [threads] [inference | training | overhead]
"""
import statistics
import sys
import time
from functools import partial

import torch

from fastattn.backends.sdpa import sdpa_attention
from fastattn.backends.torch_chunked import chunked_attention, chunked_out
from fastattn.backends.torch_small import kept_probs_attention, kept_probs_out, plain_autograd_out
from fastattn.reference import reference_attention

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


def _rotating_medians(steps, inner, rounds=31):
    """Median time of each step() over `rounds`; each round runs every step `inner` times, in an
    order that alternates and rotates, so none always follows the same one (allocator and cache
    state)."""
    names, times = list(steps), {name: [] for name in steps}
    for step in steps.values():
        step()
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order[r % len(names):] + order[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(inner):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def interleaved(fns, q, k, v, rounds=31):
    """Inference forwards, medians of `rounds` (_rotating_medians)."""
    with torch.no_grad():
        return _rotating_medians({name: partial(fn, q, k, v, 1.0) for name, fn in fns.items()},
                                 max(1, int(2e6 // (q.shape[0] * q.shape[2] * k.shape[2]))), rounds)


def inference_rule():
    """The inference rule: whole (three ops, softmax in place) vs blocks, time / naive time."""
    print("inference forward, time / naive time: whole (bmm, in-place softmax, bmm) and blocks:")
    fns = {"naive": reference_attention, "whole": kept_probs_out, "blocks": chunked_out}
    for site, B, d_qk, N, M, d_v in [("sagan64_unpooled_G", 1, 8, 1024, 1024, 64), ("sagan64_unpooled_G", 2, 8, 1024, 1024, 64),
                                     ("sagan64_unpooled_G", 4, 8, 1024, 1024, 64), ("sagan64_unpooled_G", 8, 8, 1024, 1024, 64),
                                     ("sagan128_G", 4, 32, 1024, 256, 128), ("sagan128_G", 8, 32, 1024, 256, 128),
                                     ("sagan128_G", 16, 32, 1024, 256, 128), ("studiogan64_G", 8, 20, 1024, 256, 80),
                                     ("biggan128_G", 1, 24, 4096, 1024, 96), ("biggan128_G", 2, 24, 4096, 1024, 96),
                                     ("cifar_G", 64, 48, 256, 64, 192), ("cifar_G", 256, 48, 256, 64, 192)]:
        q, k, v = torch.randn(B, d_qk, N), torch.randn(B, d_qk, M), torch.randn(B, d_v, M)
        t = interleaved(fns, q, k, v)
        print(f"  {site} B={B} ({B * N * M * 4 / 2**20:.0f} MiB): naive {t['naive'] * 1e3:.2f} ms, "
              f"whole {t['whole'] / t['naive']:.2f}, blocks {t['blocks'] / t['naive']:.2f}", flush=True)


def interleaved_training(fns, q, k, v, g, rounds=31):
    """fwd+bwd (torch.autograd.grad of out against g for q, k, v), medians of `rounds`
    (_rotating_medians)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step(fn):
        torch.autograd.grad(fn(*leaves, 1.0), leaves, g)
    return _rotating_medians({name: partial(step, fn) for name, fn in fns.items()},
                             max(1, int(1e6 // (q.shape[0] * q.shape[2] * k.shape[2]))), rounds)


def training_rule():
    """The training rule: torch's own autograd, token-major (plain) vs the kept-probabilities
    Function (kept), fwd+bwd time / naive time, by per-sample and total (B, N, M) fp32 bytes."""
    print("training fwd+bwd, time / naive time: plain (torch autograd, token-major) and kept (Function):")
    fns = {"naive": reference_attention, "plain": plain_autograd_out,
           "kept": lambda q, k, v, s: kept_probs_attention(q, k, v, s, need_lse=False)[0]}
    cases = [(B, 48, 256, 64, 192) for B in (1, 2, 4, 8, 16, 32, 64)]  # cifar_G
    cases += [(B, 16, 256, 64, 64) for B in (1, 4, 16, 64)]  # CIFAR D (d 16/64)
    cases += [(1, 8, 256, 256, 32), (4, 8, 256, 256, 32), (1, 8, 512, 256, 32), (2, 8, 512, 256, 32),
              (1, 8, 1024, 128, 32), (1, 8, 512, 512, 64), (1, 8, 1024, 256, 32), (1, 32, 1024, 256, 128),
              (1, 8, 1024, 1024, 64)]
    for B, d_qk, N, M, d_v in cases:
        q, k, v, g = torch.randn(B, d_qk, N), torch.randn(B, d_qk, M), torch.randn(B, d_v, M), torch.randn(B, d_v, N)
        t = interleaved_training(fns, q, k, v, g)
        print(f"  B={B} d_qk={d_qk} N={N} M={M} d_v={d_v} ({N * M * 4 / 2**10:.0f} KiB/sample, "
              f"{B * N * M * 4 / 2**10:.0f} KiB): naive {t['naive'] * 1e3:.3f} ms, "
              f"plain {t['plain'] / t['naive']:.3f}, kept {t['kept'] / t['naive']:.3f}", flush=True)


def call_overhead():
    """naive, the ops alone (no dispatch) and spatial_attention, fwd and fwd+bwd, time / naive."""
    from fastattn import spatial_attention
    from fastattn.backends.torch_small import _kept_probs_out_acc
    from fastattn.bench.measure import CaseInputs, make_call, time_interleaved

    print("cifar_G (d 48/192, 256x64), bench timing (time_interleaved, min 2 s per provider): "
          "time / naive time of the ops alone and of spatial_attention")
    for B in (1, 2, 8):
        gen = torch.Generator().manual_seed(0)
        x = CaseInputs(*(torch.randn(s, generator=gen) for s in ((B, 48, 256), (B, 48, 64), (B, 192, 64), (B, 192, 256))))
        for direction in ("fwd", "fwd+bwd"):
            fns = {"naive": reference_attention, "ops": _kept_probs_out_acc if direction == "fwd" else plain_autograd_out,
                   "fastattn": lambda q, k, v, s: spatial_attention(q, k, v, scale=s)}
            timed = time_interleaved({n: make_call(f, direction, x, 1.0) for n, f in fns.items()},
                                     torch.device("cpu"), 2.0, 50, 4000)
            t = {n: r[0].median_s for n, r in timed.items()}
            print(f"  B={B} {direction}: naive {t['naive'] * 1e6:.1f} us, ops {t['ops'] / t['naive']:.3f}, "
                  f"fastattn {t['fastattn'] / t['naive']:.3f} ({(t['fastattn'] - t['ops']) * 1e6:+.1f} us over the ops)",
                  flush=True)


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    if sys.argv[2:] == ["inference"]:
        inference_rule()
        return
    if sys.argv[2:] == ["training"]:
        training_rule()
        return
    if sys.argv[2:] == ["overhead"]:
        call_overhead()
        return
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
