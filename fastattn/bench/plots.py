"""PNG plots of a benchmark run (matplotlib, Agg backend): time and peak memory per sample against
the problem size for each provider, and each provider's time / naive time per site.

The x axis is not N alone: several sites share N (pooled and unpooled layers at one resolution)
and differ in M and the channel widths. Time is plotted against the matmul FLOPs per sample of
the direction (what it scales with), memory against N*M, the (query, key) pairs per sample (what
the naive path's matrices scale with). Points are labelled with their site ids."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .report import machine_line

__all__ = ["write_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(records: list[dict]) -> list[tuple[str, str]]:
    """(dtype, direction) pairs present among the successful records, in run order."""
    seen = []
    for r in records:
        if r["status"] == "ok" and (r["dtype"], r["direction"]) not in seen:
            seen.append((r["dtype"], r["direction"]))
    return seen


def _x_flops(r: dict) -> tuple[float, str]:
    return r["flops"] / r["B"] / 1e9, "GFLOP per sample (matmuls of this direction)"


def _x_pairs(r: dict) -> tuple[float, str]:
    return r["N"] * r["M"], "N*M (query-key pairs per sample)"


def _against_size(records, groups, field: str, scale: float, x_of, ylabel: str, title: str, env: dict,
                  path: Path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.5), squeeze=False)
    for ax, (dtype, direction) in zip(axes[0], groups):
        series, xlabel = defaultdict(list), ""
        for r in records:
            if r["status"] == "ok" and r["dtype"] == dtype and r["direction"] == direction and r.get(field):
                series[r["provider"]].append((x_of(r)[0], r[field] * scale / r["B"], r["shape"]))
                xlabel = x_of(r)[1]
        labelled = set()
        for provider, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle="none", label=provider)
            for x, y, site in points:
                if site not in labelled:
                    labelled.add(site)
                    ax.annotate(site, (x, y), fontsize=6, alpha=0.7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{dtype} {direction}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n{machine_line(env)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time_ratio(records, groups, env: dict, path: Path):
    plt = _pyplot()
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 3.8 * len(groups)), squeeze=False)
    for ax, (dtype, direction) in zip(axes[:, 0], groups):
        rows = [r for r in records if r["status"] == "ok" and r["dtype"] == dtype
                and r["direction"] == direction and r.get("time_vs_naive") and r["provider"] != "naive"]
        sites = list(dict.fromkeys(f"{r['shape']}\nB={r['B']}" for r in rows))
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            values = {f"{r['shape']}\nB={r['B']}": r["time_vs_naive"] for r in rows if r["provider"] == provider}
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(sites))]
            ax.bar(xs, [values.get(s, 0.0) for s in sites], width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels(sites, fontsize=7)
        ax.set_ylabel("time / naive time (below 1: faster)")
        ax.set_title(f"{dtype} {direction}")
        ax.legend(fontsize=8)
    fig.suptitle(f"Time relative to the naive path per site (provider time / naive time)\n{machine_line(env)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(records: list[dict], env: dict, directory: str) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    groups = _groups(records)
    if not groups:
        return []
    paths = [out / "time_vs_flops.png", out / "memory_vs_pairs.png", out / "time_vs_naive_per_site.png"]
    _against_size(records, groups, "median_s", 1e3, _x_flops, "median ms per sample", "Time against work",
                  env, paths[0])
    _against_size(records, groups, "peak_bytes", 2.0**-20, _x_pairs, "peak MiB per sample (beyond inputs)",
                  "Peak memory against N*M", env, paths[1])
    _time_ratio(records, groups, env, paths[2])
    return paths
