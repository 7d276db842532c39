"""The README's results tables, generated from committed `fastattn bench --json` results.

Attention presets: one row per site, median time of naive, SDPA and fastattn-torch side by side
and fastattn's time and peak-memory ratios, both as "fastattn / naive" (below 1: fastattn is
faster / smaller); `train-step` results: one row per image resolution, the whole G+D step. The
machine line (CPU, threads, load average at the start) comes from the results.
    python benchmarks/readme_table.py benchmarks/results/cpu/train-step.json benchmarks/results/cpu/gan.json
    python benchmarks/readme_table.py --direction fwd benchmarks/results/cpu/quick.json
"""
from __future__ import annotations

import argparse
import json

PROVIDERS = ("naive", "sdpa", "fastattn-torch")


def _machine(env: dict, path: str) -> str:
    load = env.get("load_average_at_start")
    load_text = f", load average {load[0]:.1f} at start" if load else ""
    device = env["cpu_model"] if env["device_type"] == "cpu" else env["device"]
    note = f" Note: {env['note']}." if env.get("note") else ""
    return (f"{device}, {env['cpu_cores']} cores ({env['torch_threads']} torch threads{load_text}), torch {env['torch']}, "
            f"{env['date'][:10]}, commit {(env.get('git_commit') or '?')[:8]}; source `{path}`.{note}")


def _spread(r: dict) -> str:
    value = r.get("spread")
    if value is None and r.get("median_s"):
        value = (r["q75_s"] - r["q25_s"]) / r["median_s"]
    return "-" if value is None else f"±{50 * value:.0f}%" + (" UNSTABLE" if r.get("unstable") else "")


def train_step_table(path: str) -> str:
    data = json.loads(open(path).read())
    env, records = data["env"], data["records"]
    lines = [f"`train-step` preset: {env.get('setting', '')}. {_machine(env, path)}", "",
             "| image px | attention at (N x M) | B | ch | naive step ms | fastattn step ms | time: fastattn / naive "
             "| naive step MiB | fastattn step MiB | memory: fastattn / naive |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by: dict[int, dict] = {}
    for r in records:
        if r["status"] == "ok":
            by.setdefault(r["resolution"], {})[r["provider"]] = r
    for resolution, pair in by.items():
        if set(pair) != {"naive", "fastattn"}:
            continue
        naive, ours = pair["naive"], pair["fastattn"]
        mem = (f"{ours['peak_bytes'] / naive['peak_bytes']:.2f}" if naive.get("peak_bytes") and
               ours.get("peak_bytes") is not None else "-")
        lines.append(
            f"| {resolution} | {naive['attn_resolution']}x{naive['attn_resolution']} ({naive['N']} x {naive['M']}) "
            f"| {naive['batch']} | {naive['ch']} | {naive['median_s'] * 1e3:.0f} ({_spread(naive)}) "
            f"| {ours['median_s'] * 1e3:.0f} ({_spread(ours)}) | {ours['median_s'] / naive['median_s']:.2f} "
            f"| {(naive.get('peak_bytes') or 0) / 2**20:.0f} | {(ours.get('peak_bytes') or 0) / 2**20:.0f} | {mem} |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def table(path: str, direction: str = "fwd+bwd") -> str:
    data = json.loads(open(path).read())
    env = data["env"]
    if env.get("preset") == "train-step":
        return train_step_table(path)
    rows: dict[tuple, dict] = {}
    for r in data["records"]:
        if r["direction"] == direction and r["status"] == "ok" and r["provider"] in PROVIDERS:
            rows.setdefault((r["shape"], r["B"], r["N"], r["M"], r["d_qk"], r["d_v"], r["dtype"]), {})[r["provider"]] = r
    lines = [
        f"`{env['preset']}` preset, {direction}, {_machine(env, path)}",
        "",
        "| site | B | N | M | d_qk | d_v | naive ms | SDPA ms | fastattn ms | time: fastattn / naive | naive MiB "
        "| fastattn MiB | memory: fastattn / naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (site, B, N, M, d_qk, d_v, _), by in rows.items():
        if not all(p in by for p in PROVIDERS):
            continue
        naive, sdpa, ours = (by[p] for p in PROVIDERS)
        mem = "-"
        if naive.get("peak_bytes") and ours.get("peak_bytes") is not None:
            ratio = ours['peak_bytes'] / naive['peak_bytes']
            mem = f"{ratio:.3f}" if ratio < 0.1 else f"{ratio:.2f}"
        lines.append(
            f"| {site} | {B} | {N} | {M} | {d_qk} | {d_v} | {_ms(naive['median_s'])} | {_ms(sdpa['median_s'])} "
            f"| {_ms(ours['median_s'])} | {ours['median_s'] / naive['median_s']:.2f} "
            f"| {(naive.get('peak_bytes') or 0) / 2**20:.1f} | {(ours.get('peak_bytes') or 0) / 2**20:.1f} | {mem} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--direction", default="fwd+bwd", choices=("fwd", "bwd", "fwd+bwd"))
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    print("\n\n".join(table(path, args.direction) for path in args.paths))
