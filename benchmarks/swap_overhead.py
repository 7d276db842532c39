"""What a layer swapped by computation costs against the layer as written, per call, on the CPU.

A layer that fastattn.swap_attention captures by computation runs its own forward under a
TorchFunctionMode that sees every torch call (convs, norms, spectral-norm hooks), and only its
attention core goes to fastattn. Three ways to run the same layer, timed interleaved
(fastattn.bench.measure.time_interleaved, one call of each per round):

  original  the layer as written (bmm / einsum / matmul, softmax, ...)
  captured  swapped, its core always through fastattn (swap.forward.always_capture)
  swapped   swapped, as users get it: calls whose core matrix is at most SWAP_DIRECT_MAX_BYTES
            run the forward as written (swap.forward.direct_is_faster), larger ones are captured

Printed per case: the core's (B', N, M) matrix in fp32 and each time / original time. Layers
from tests/swap/swap_corpus.py (written the ways public GAN and diffusion code writes them),
built at C = 64 (C = 128 for the multi-head ones).

    python benchmarks/swap_overhead.py [--threads 1] [--min-time 0.5]
    python benchmarks/swap_overhead.py --swap-time   # what swap_attention itself takes
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from fastattn import swap_attention
from fastattn.bench.measure import time_interleaved
from fastattn.bench.report import environment, machine_line, short_commit
from fastattn.swap.forward import always_capture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "swap"))
from swap_corpus import CORPUS  # noqa: E402

LAYERS = ("param_sn_avgpool", "biggan_y_ignored_scaled", "linear_channels_last", "groupnorm_attnblock",
          "multihead_qkv_einsum_h32", "sdpa_heads")
CASES = ((1, 8), (8, 8), (1, 16), (8, 16), (1, 32), (8, 32))  # (B, H = W)


def _core_bytes(layer, x) -> int:
    """Bytes of the (B', N, M) fp32 matrix of the layer's core(s) for input x."""
    from fastattn.swap import capture

    seen = []
    attend = capture.AttentionCapture._attend

    def spy(self, q, k, v, scale):
        seen.append(q.shape[0] * q.shape[2] * k.shape[2] * 4)
        return attend(self, q, k, v, scale)

    capture.AttentionCapture._attend = spy
    try:
        with torch.no_grad(), always_capture():
            layer(x)
    finally:
        capture.AttentionCapture._attend = attend
    return max(seen)


def _call(layer, x, direction):
    params = [p for p in layer.parameters() if p.requires_grad]
    leaf = x.clone().requires_grad_(direction != "fwd")

    def call(_):
        if direction == "fwd":
            with torch.no_grad():
                return layer(leaf)
        out = layer(leaf)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out.sum(), [leaf, *params], allow_unused=True)
    return call


def swap_times(repeats: int = 7) -> None:
    """Median wall time of fastattn.swap_attention per corpus layer (fp32, the corpus's own widths:
    trace in eval and training mode, then the probe) and on the reference GAN's G + D."""
    import statistics
    import time

    from fastattn.models import Discriminator, Generator

    def median_time(make):
        times = []
        for _ in range(repeats):
            model = make()
            start = time.perf_counter()
            handle = swap_attention(model)
            times.append(time.perf_counter() - start)
            assert handle.swapped, handle.summary()
        return statistics.median(times)

    print(f"# swap_attention wall time, medians of {repeats} (a fresh model each)")
    layer_times = []
    for name, (build, (channels, _, _), _) in CORPUS.items():
        t = median_time(build)
        layer_times.append(t)
        print(f"{name} (C={channels}): {t * 1e3:.0f} ms")
    print(f"corpus layers: median {statistics.median(layer_times) * 1e3:.0f} ms, "
          f"range {min(layer_times) * 1e3:.0f}-{max(layer_times) * 1e3:.0f} ms")

    def gan():
        return torch.nn.ModuleDict({"G": Generator(32, attention="naive"), "D": Discriminator(32, attention="naive")})
    print(f"reference GAN (Generator(32) + Discriminator(32), naive layers): {median_time(gan) * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per provider and case (at least)")
    parser.add_argument("--layer", action="append", choices=sorted(CORPUS), metavar="NAME",
                        help=f"corpus layers to time (repeatable; default: {', '.join(LAYERS)})")
    parser.add_argument("--swap-time", action="store_true",
                        help="time swap_attention itself per corpus layer and on the reference GAN, then stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    if args.swap_time:
        print(f"# {machine_line(env)}")
        swap_times()
        return
    print(f"# {machine_line(env)}, commit {short_commit(env)}; "
          f"medians of interleaved rounds (>= {args.min_time:g} s and 10 rounds each); time / original time")
    print("| layer | B | H=W | core matrix | dir | original ms | captured | swapped |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.layer or LAYERS:
        build, (channels, _, _), _ = CORPUS[name]
        channels = 128 if channels >= 64 else 64
        cls = type(build())
        for batch, side in CASES:
            torch.manual_seed(0)
            original = cls(channels)
            swapped = copy.deepcopy(original)
            swap_attention(swapped)
            x = torch.randn(batch, channels, side, side)
            size = _core_bytes(swapped, x)
            for direction in ("fwd", "fwd+bwd"):
                for layer in (original, swapped):
                    layer.train(direction != "fwd")
                captured_call = _call(swapped, x, direction)

                def captured(arg, call=captured_call):
                    with always_capture():
                        return call(arg)
                calls = {"original": (lambda: None, _call(original, x, direction)),
                         "captured": (lambda: None, captured),
                         "swapped": (lambda: None, _call(swapped, x, direction))}
                timed = time_interleaved(calls, torch.device("cpu"), args.min_time, 10, 2000)
                for provider, result in timed.items():
                    if isinstance(result, BaseException):
                        raise result
                t = {provider: result[0].median_s for provider, result in timed.items()}
                print(f"| {name} | {batch} | {side} | {size / 2**10:.0f} KiB | {direction} | "
                      f"{t['original'] * 1e3:.2f} | {t['captured'] / t['original']:.2f} | "
                      f"{t['swapped'] / t['original']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
