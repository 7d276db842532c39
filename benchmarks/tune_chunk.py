"""Sweep the torch backend's block constants, side by side with the naive layer (and SDPA).

Each candidate value of a constant is one provider in fastattn.bench.measure.time_interleaved:
the candidates, the naive layer and SDPA run one call each per round, in alternating, rotated
order, so a change in the machine's load hits all of them alike. Printed: median time / naive
time of each candidate (and SDPA's) ± half the inter-quartile range over the median, per
site. The chosen values and their provenance live in fastattn/constants.py; the committed runs
are in benchmarks/results/cpu/tune_chunk_*.txt.

    python benchmarks/tune_chunk.py [--threads 1] [--mode budget|rows|double] [--rounds 7] [--site ID]

budget: the block buffer's bytes (TORCH_CHUNK_BYTES_ONE_THREAD on one torch thread, else
        TORCH_CHUNK_BYTES), fp32 fwd+bwd, at the pooled 4096 x 1024 and 16384 x 4096 sites and
        the unpooled 1024 x 1024 one.
rows:   TORCH_CHUNK_MIN_ROWS (the fewest query rows a block takes when the batch is large),
        fp32 fwd+bwd, at the large-batch 1024 x 256 sites.
double: DOUBLE_BACKWARD_CHUNK_BYTES, the R1-style double backward (forward, backward with
        create_graph, backward of the squared gradients' sum).
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

from fastattn import constants, spatial_attention
from fastattn.bench.measure import CaseInputs, make_call, time_interleaved
from fastattn.bench.presets import PENALTY_DIRECTION
from fastattn.bench.report import environment, machine_line, short_commit
from fastattn.functional import clear_dispatch_cache
from fastattn.reference import reference_attention
from fastattn.shapes import gan_shape

MIB = 2**20
# (site id, batch) of each mode; candidate values in MiB (budgets) or rows
MODES = {
    "budget": dict(direction="fwd+bwd", values=(1, 2, 4, 8), unit=MIB,
                   sites=(("biggan128_G", 1), ("biggan128_G", 6), ("biggan128_D", 12),
                          ("biggan256_G128", 1), ("sagan64_unpooled_G", 8))),
    "rows": dict(direction="fwd+bwd", values=(32, 128, 256), unit=1, constant="TORCH_CHUNK_MIN_ROWS",
                 sites=(("studiogan64_G", 119), ("sagan128_G", 64), ("sagan64_unpooled_G", 42))),
    "double": dict(direction=PENALTY_DIRECTION, values=(2, 4, 8), unit=MIB, constant="DOUBLE_BACKWARD_CHUNK_BYTES",
                   sites=(("r1", 4), ("sagan64_unpooled_G", 16), ("biggan128_D", 12))),
}
# the R1 gradient-penalty site of the README's table: a pooled 64x64 discriminator layer
R1_SITE = dict(d_qk=16, N=4096, M=1024, d_v=64)


def _budget_constant() -> str:
    return "TORCH_CHUNK_BYTES_ONE_THREAD" if torch.get_num_threads() == 1 else "TORCH_CHUNK_BYTES"


@contextmanager
def _constant(name: str, value: int):
    old = getattr(constants, name)
    setattr(constants, name, value)
    try:
        yield
    finally:
        setattr(constants, name, old)


def _with_constant(name: str, value: int):
    def run(q, k, v, scale):
        with _constant(name, value):
            return spatial_attention(q, k, v, scale=scale, backend="torch")
    return run


def _sdpa(q, k, v, scale):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)


def _inputs(site: str, batch: int) -> CaseInputs:
    if site == "r1":
        d_qk, n, m, d_v = R1_SITE["d_qk"], R1_SITE["N"], R1_SITE["M"], R1_SITE["d_v"]
    else:
        s = gan_shape(site)
        d_qk, n, m, d_v = s.d_qk, s.N, s.M, s.d_v
    gen = torch.Generator().manual_seed(0)
    return CaseInputs(*(torch.randn(shape, generator=gen)
                        for shape in ((batch, d_qk, n), (batch, d_qk, m), (batch, d_v, m), (batch, d_v, n))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=sorted(MODES), default="budget")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--site", action="append", metavar="ID",
                        help="only this site of the mode (repeatable; default: all of them)")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error(f"--rounds must be at least 3 (a median and a spread), got {args.rounds}")
    torch.set_num_threads(args.threads)
    mode = MODES[args.mode]
    sites = [(site, batch) for site, batch in mode["sites"] if not args.site or site in args.site]
    if not sites:
        parser.error(f"--site must name sites of mode {args.mode!r}: {[site for site, _ in mode['sites']]}, "
                     f"got {args.site}")
    name = mode.get("constant") or _budget_constant()
    unit = "MiB" if mode["unit"] == MIB else "rows"
    env = environment(torch.device("cpu"))
    print(f"# {args.mode}: {name}; {machine_line(env)}, commit {short_commit(env)}; "
          f"{mode['direction']}, fp32, medians of "
          f"{args.rounds} interleaved rounds; time / naive time ± half-IQR")
    print(f"# current value: {getattr(constants, name) // mode['unit']} {unit}")
    for site, batch in sites:
        x = _inputs(site, batch)
        fns = {"naive": reference_attention, "sdpa": _sdpa}
        fns.update({f"{value} {unit}": _with_constant(name, value * mode["unit"]) for value in mode["values"]})
        if mode["direction"] == PENALTY_DIRECTION:
            del fns["sdpa"]  # its math path's double backward keeps the matrix like naive's
        clear_dispatch_cache()
        timed = time_interleaved({n: make_call(fn, mode["direction"], x, 1.0) for n, fn in fns.items()},
                                 torch.device("cpu"), 0.0, args.rounds, args.rounds)
        for n, result in timed.items():
            if isinstance(result, BaseException):
                raise result
        naive = timed["naive"][0].median_s
        cells = [f"{n} {r[0].median_s / naive:.2f} ±{r[0].spread / 2:.0%}"
                 for n, r in timed.items() if n != "naive"]
        print(f"{site} B={batch} ({x.q.shape[2]}x{x.k.shape[2]}, d {x.q.shape[1]}/{x.v.shape[1]}): "
              f"naive {naive * 1e3:.1f} ms; " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
