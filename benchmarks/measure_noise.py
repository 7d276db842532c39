"""Measure the run-to-run noise of `fastattn bench` on this machine, to set BENCH_REGRESSION_RATIO.

    python benchmarks/measure_noise.py --runs 3 -- --preset quick --threads 1 --no-memory --no-check

Runs the same benchmark several times with unchanged code and prints, over every pair of runs
and every case, the within-run spread (q75/q25), the ratio of medians, and the smallest
--regression-ratio that would have flagged none of these identical-code comparisons (the gate
also requires non-overlapping interquartile ranges). Set the constant above that value.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys

from fastattn.bench.cli import parse_args, run
from fastattn.bench.report import record_key


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    split = argv.index("--") if "--" in argv else len(argv)
    args, bench_argv = parser.parse_args(argv[:split]), argv[split + 1:]
    runs = []
    for i in range(args.runs):
        bench_args = parse_args(bench_argv + ["--no-progress"])
        env, records = run(bench_args)
        runs.append({record_key(r): r for r in records if r["status"] == "ok"})
        print(f"run {i + 1}/{args.runs} done ({len(runs[-1])} cases)", file=sys.stderr)
    spreads = sorted(r["q75_s"] / r["q25_s"] for run_ in runs for r in run_.values())
    ratios, separated = [], []
    for old, new in itertools.permutations(runs, 2):
        for key in old.keys() & new.keys():
            ratio = new[key]["median_s"] / old[key]["median_s"]
            ratios.append(ratio)
            if new[key]["q25_s"] > old[key]["q75_s"]:
                separated.append(ratio)
    ratios.sort()

    def pct(values, p):
        return values[min(len(values) - 1, int(p * len(values)))]

    print(f"machine: {env['cpu_model'] if env['device_type'] == 'cpu' else env['device']}, "
          f"{env['cpu_cores']} cores, {env['date']}")
    print(f"within-run spread q75/q25 over {len(spreads)} cases: median {statistics.median(spreads):.3f}, "
          f"p90 {pct(spreads, 0.9):.3f}, max {spreads[-1]:.3f}")
    print(f"run-to-run median ratio over {len(ratios)} comparisons: p50 {pct(ratios, 0.5):.3f}, "
          f"p95 {pct(ratios, 0.95):.3f}, max {ratios[-1]:.3f}")
    needed = max(separated, default=1.0)
    print(f"smallest ratio that flags none of these identical-code comparisons: {needed:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
