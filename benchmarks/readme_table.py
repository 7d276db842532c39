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
OURS = ("fastattn", "fastattn-torch")  # automatic choice, else the torch backend forced (older results)


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
        if r["direction"] == direction and r["status"] == "ok" and r["provider"] in (*PROVIDERS, *OURS):
            provider = "fastattn-torch" if r["provider"] in OURS else r["provider"]
            rows.setdefault((r["shape"], r["B"], r["N"], r["M"], r["d_qk"], r["d_v"], r["dtype"]), {})[provider] = r
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


def _ours(by: dict) -> dict | None:
    return next((by[p] for p in OURS if p in by), None)


def _ratio_cell(ours: dict | None, base: dict | None) -> str:
    """ours / base with the larger of the two spreads; bold when above 1 by more than that spread."""
    if not ours or not base:
        return "-"
    ratio = ours["median_s"] / base["median_s"]
    spread = max(ours.get("spread") or 0.0, base.get("spread") or 0.0) / 2
    text = f"{ratio:.2f} ±{100 * spread:.0f}%"
    return f"**{text}**" if ratio > 1 + spread else text


def ratio_table(path: str) -> str:
    """One row per (site, B): fastattn / naive and fastattn / SDPA, fwd and fwd+bwd, each with the
    spread of the two medians (half their relative IQR, the larger); the fwd+bwd memory ratio; and
    the backend that automatic choice ran."""
    data = json.loads(open(path).read())
    env = data["env"]
    rows: dict[tuple, dict] = {}
    for r in data["records"]:
        if r["status"] == "ok":
            rows.setdefault((r["shape"], r["B"], r["N"], r["M"], r["d_qk"], r["d_v"]), {}) \
                .setdefault(r["direction"], {})[r["provider"]] = r
    lines = [
        f"`{env['preset']}` preset, {_machine(env, path)} Ratios are fastattn time / other time (below 1: "
        "fastattn is faster), ± the larger relative half-IQR of the two; bold: slower by more than that.",
        "",
        "| site | B | N x M, d_qk / d_v | fwd: / naive | fwd+bwd: / naive | fwd: / SDPA | fwd+bwd: / SDPA "
        "| memory fwd+bwd: / naive | backend |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (site, B, N, M, d_qk, d_v), by_dir in rows.items():
        fwd, both = by_dir.get("fwd", {}), by_dir.get("fwd+bwd", {})
        ours_both = _ours(both)
        mem = "-"
        if ours_both and both.get("naive", {}).get("peak_bytes") and ours_both.get("peak_bytes") is not None:
            ratio = ours_both["peak_bytes"] / both["naive"]["peak_bytes"]
            mem = f"{ratio:.3f}" if ratio < 0.1 else f"{ratio:.2f}"
        backend = (ours_both or _ours(fwd) or {}).get("backend") or "-"
        lines.append(
            f"| {site} | {B} | {N} x {M}, {d_qk} / {d_v} | {_ratio_cell(_ours(fwd), fwd.get('naive'))} "
            f"| {_ratio_cell(ours_both, both.get('naive'))} | {_ratio_cell(_ours(fwd), fwd.get('sdpa'))} "
            f"| {_ratio_cell(ours_both, both.get('sdpa'))} | {mem} | {backend} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--direction", default="fwd+bwd", choices=("fwd", "bwd", "fwd+bwd"))
    parser.add_argument("--ratios", action="store_true",
                        help="one row per site and batch: fwd and fwd+bwd ratios against naive and SDPA")
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    print("\n\n".join(ratio_table(path) if args.ratios and "train-step" not in path else table(path, args.direction)
                        for path in args.paths))
