"""fp32 accuracy at large unscaled logits: each backend's error against fp64, as a ratio of the
naive PyTorch path's own fp32 error (the accuracy rule allows 2x for out/lse, 3x for gradients,
plus constants.ERROR_FLOOR; the last column says whether every output is within it).

    TRITON_INTERPRET=1 python benchmarks/large_logit_accuracy.py [--backends torch,triton]

q and k are scaled so that the largest |logit| is about each target magnitude. On CPU the
Triton kernels run in the interpreter (its tl.dot goes through numpy's BLAS: set e.g.
OPENBLAS_CORETYPE=Haswell to see another BLAS's rounding).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from fastattn import spatial_attention  # noqa: E402
from fastattn.constants import ERROR_RATIO_GRAD, ERROR_RATIO_OUT  # noqa: E402
from fastattn.reference import reference_attention  # noqa: E402
from fastattn.testing import error_bound, max_abs_error  # noqa: E402

MAGNITUDES = (10, 40, 400, 2.5e3, 1.1e4, 3e4)
SHAPES = ((2, 10, 63, 40, 96), (2, 8, 64, 64, 16))  # (B, d_qk, N, M, d_v)
NAMES = ("out", "lse", "dq", "dk", "dv")


def inputs(shape, magnitude, seed):
    batch, d_qk, n, m, d_v = shape
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(batch, d_qk, n, generator=gen), torch.randn(batch, d_qk, m, generator=gen)
    factor = (magnitude / float(torch.bmm(q.transpose(1, 2), k).abs().max())) ** 0.5
    v = torch.randn(batch, d_v, m, generator=gen)
    return q * factor, k * factor, v, torch.randn(batch, d_v, n, generator=gen), torch.randn(batch, n, generator=gen)


def run(q, k, v, grad_out, grad_lse, backend, scale):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if backend is None:
        out, lse = reference_attention(*leaves, scale, return_lse=True)
    else:
        out, lse = spatial_attention(*leaves, scale=scale, backend=backend, return_lse=True)
    torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,triton")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    ratios = [ERROR_RATIO_OUT] * 2 + [ERROR_RATIO_GRAD] * 3
    print(f"scale={args.scale}; cells: error / naive fp32 error (worst over {args.seeds} seed(s))")
    print(f"{'backend':8} {'shape':18} {'|logit|':>8} " + " ".join(f"{n:>7}" for n in NAMES) + "  rule")
    for backend in args.backends.split(","):
        for shape in SHAPES:
            for magnitude in MAGNITUDES:
                worst, ok = [0.0] * 5, True
                for seed in range(args.seeds):
                    q, k, v, go, gl = inputs(shape, magnitude, seed)
                    want = run(q.double(), k.double(), v.double(), go.double(), gl.double(), None, args.scale)
                    naive = run(q, k, v, go, gl, None, args.scale)
                    got = run(q, k, v, go, gl, backend, args.scale)
                    for i, (g, nv, w) in enumerate(zip(got, naive, want)):
                        err, naive_err = max_abs_error(g, w), max_abs_error(nv, w)
                        worst[i] = max(worst[i], err / max(naive_err, 1e-30))
                        ok &= err <= error_bound(naive_err, ratios[i], torch.float32)
                cells = " ".join(f"{r:7.2f}" for r in worst)
                print(f"{backend:8} {str(shape[1:]):18} {magnitude:8.3g} {cells}  {'ok' if ok else 'FAIL'}",
                      flush=True)


if __name__ == "__main__":
    main()
