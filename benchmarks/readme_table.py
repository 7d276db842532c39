"""The README's results table, generated from committed `fastattn bench --json` results.

One row per site: median forward+backward time of naive, SDPA and fastattn-torch side by side,
fastattn's time and peak-memory ratios against naive, and the machine line from the results.
    python benchmarks/readme_table.py benchmarks/results/cpu/stress.json benchmarks/results/cpu/gan.json
"""
from __future__ import annotations

import json
import sys

PROVIDERS = ("naive", "sdpa", "fastattn-torch")


def table(path: str, direction: str = "fwd+bwd") -> str:
    data = json.loads(open(path).read())
    env = data["env"]
    rows: dict[tuple, dict] = {}
    for r in data["records"]:
        if r["direction"] == direction and r["status"] == "ok" and r["provider"] in PROVIDERS:
            rows.setdefault((r["shape"], r["B"], r["N"], r["M"], r["d_qk"], r["d_v"], r["dtype"]), {})[r["provider"]] = r
    lines = [
        f"`{env['preset']}` preset, {direction}, {env['cpu_model'] if env['device_type'] == 'cpu' else env['device']}, "
        f"{env['cpu_cores']} cores ({env['torch_threads']} threads), torch {env['torch']}, {env['date'][:10]}, "
        f"commit {env['git_commit'][:8]}; source `{path}`",
        "",
        "| site | B | N | M | d_qk | d_v | naive ms | SDPA ms | fastattn ms | time vs naive | naive MiB | fastattn MiB | memory vs naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (site, B, N, M, d_qk, d_v, _), by in rows.items():
        if not all(p in by for p in PROVIDERS):
            continue
        naive, sdpa, ours = (by[p] for p in PROVIDERS)
        lines.append(
            f"| {site} | {B} | {N} | {M} | {d_qk} | {d_v} | {naive['median_s'] * 1e3:.0f} | {sdpa['median_s'] * 1e3:.0f} "
            f"| {ours['median_s'] * 1e3:.0f} | {ours['median_s'] / naive['median_s']:.2f}x "
            f"| {naive['peak_bytes'] / 2**20:.0f} | {ours['peak_bytes'] / 2**20:.1f} "
            f"| {ours['peak_bytes'] / naive['peak_bytes'] * 100:.1f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(path) for path in sys.argv[1:]))
