"""Sweep the torch backend's chunk budget (fastattn.constants.TORCH_CHUNK_BYTES).

Prints the median forward+backward time per budget at the two CPU target sites of the
foundation issue; the chosen constant and its provenance live in fastattn/constants.py.
Run: python benchmarks/tune_chunk.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from fastattn import constants, spatial_attention

SITES = {  # id: (B, N, M, d_qk, d_v)
    "biggan256_G128": (1, 16384, 4096, 24, 96),
    "stress_unpooled128": (1, 16384, 16384, 8, 64),
}
BUDGETS_MIB = [1, 2, 4, 8, 16, 32, 64]


def time_fwd_bwd(B, N, M, d_qk, d_v, repeats):
    q = torch.randn(B, d_qk, N, requires_grad=True)
    k = torch.randn(B, d_qk, M, requires_grad=True)
    v = torch.randn(B, d_v, M, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        spatial_attention(q, k, v, backend="torch").sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # first run is warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'budget MiB':>10} " + " ".join(f"{s:>20}" for s in SITES))
    for mib in BUDGETS_MIB:
        constants.TORCH_CHUNK_BYTES = constants.TORCH_CHUNK_BYTES_ONE_THREAD = mib * 2**20
        row = [time_fwd_bwd(*shape, args.repeats) for shape in SITES.values()]
        print(f"{mib:>10} " + " ".join(f"{t:>19.3f}s" for t in row), flush=True)


if __name__ == "__main__":
    main()
