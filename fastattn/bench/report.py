"""What a benchmark run produces: the environment block, derived columns, the markdown table,
the JSON file, and the comparison against an earlier JSON file."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from ..constants import (BENCH_REGRESSION_RATIO, BOUND_EXP2_PER_CLOCK_PER_SM, BOUND_FLOP_PER_CLOCK_PER_SM,
                         ERROR_RATIO_GRAD)
from ..accuracy import error_bound
from .measure import is_unstable, spread
from .presets import DTYPES

__all__ = ["environment", "add_derived", "markdown_table", "write_json", "load_json", "compare",
           "machine_line", "record_key", "is_slower"]

# Peaks below this are too close to the CPU method's noise floor (measured 0-70 KiB) for a ratio.
_MIN_PEAK_FOR_RATIO = 256 * 2**10

RECORD_KEY_FIELDS = ("shape", "B", "N", "M", "d_qk", "d_v", "dtype", "direction", "provider")


def record_key(record: dict) -> tuple:
    return tuple(record.get(field) for field in RECORD_KEY_FIELDS)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: other work on a shared machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        # results written by earlier steps of a results run do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)benchmarks/results"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _gpu_clock_and_sms(device: torch.device) -> dict:
    """SM count and SM clock (Hz) from torch or Triton's driver, whichever has them."""
    props = torch.cuda.get_device_properties(device)
    info = {"sm_count": props.multi_processor_count, "sm_clock_hz": None, "clock_source": None,
            "compute_capability": f"{props.major}.{props.minor}"}
    clock_khz = getattr(props, "clock_rate", None)
    if clock_khz:
        info.update(sm_clock_hz=clock_khz * 1e3, clock_source="torch.cuda.get_device_properties")
        return info
    try:
        from triton.runtime import driver

        tprops = driver.active.utils.get_device_properties(device.index or 0)
        for key in ("sm_clock_rate", "max_clock_rate", "clock_rate"):
            if tprops.get(key):
                info.update(sm_clock_hz=tprops[key] * 1e3, clock_source=f"triton driver {key}")
                break
    except Exception as error:  # recorded, not fatal: only %-of-bound needs the clock
        info["clock_source"] = f"unknown ({type(error).__name__}: {error})"
    return info


def environment(device: torch.device) -> dict:
    from ..version import __version__

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastattn": __version__,
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": _load_average(),
    }
    if device.type == "cuda":
        env.update(_gpu_clock_and_sms(device))
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def short_commit(env: dict) -> str:
    """The commit of `env` in 8 hex digits, with "-dirty" kept: for one-line result headers."""
    commit = env.get("git_commit") or "unknown"
    return commit[:8] + ("-dirty" if commit.endswith("-dirty") else "")


def machine_line(env: dict) -> str:
    if env.get("device_type") == "cuda":
        return (f"{env['device']} (sm {env.get('compute_capability')}, {env.get('sm_count')} SMs), "
                f"torch {env['torch']}, triton {env.get('triton')}")
    load = env.get("load_average_at_start")
    load_text = f", load average {load[0]:.1f} at start" if load else ""
    return (f"CPU {env['cpu_model']}, {env['cpu_cores']} cores ({env['torch_threads']} torch threads), "
            f"torch {env['torch']}, triton {env.get('triton')}{load_text}")


def _bound_seconds(record: dict, env: dict) -> float | None:
    """No-overlap lower bound on the time: per (query, key) pair, the matmul clocks at the tensor-
    core rate plus the exp clocks, per SM, over all SMs at the SM clock."""
    major_minor = env.get("compute_capability")
    flop_rate = BOUND_FLOP_PER_CLOCK_PER_SM.get(major_minor)
    if not flop_rate or not env.get("sm_clock_hz") or record["dtype"] not in ("float16", "bfloat16"):
        return None
    d_qk, d_v = record["d_qk"], record["d_v"]
    per_pair = {"fwd": 2 * (d_qk + d_v) / flop_rate + 1 / BOUND_EXP2_PER_CLOCK_PER_SM,
                "bwd": 2 * (3 * d_qk + 2 * d_v) / flop_rate + 1 / BOUND_EXP2_PER_CLOCK_PER_SM}
    clocks = per_pair["fwd"] * (record["direction"] != "bwd") + per_pair["bwd"] * (record["direction"] != "fwd")
    if record["direction"] == "fwd+bwd+bwd2":  # the second backward: see presets.attention_flops
        clocks += 2 * (7 * d_qk + 5 * d_v) / flop_rate + 1 / BOUND_EXP2_PER_CLOCK_PER_SM
    pairs = record["B"] * record["N"] * record["M"]
    return pairs * clocks / (env["sm_count"] * env["sm_clock_hz"])


def _match(record: dict, naive: dict | None) -> str | None:
    """OK when the output is elementwise within TOLERANCES and so are the gradients, or, since
    gradients sum over thousands of queries, when their error is within the accuracy rule
    (ERROR_RATIO_GRAD x the naive path's gradient error in the same dtype, plus ERROR_FLOOR)."""
    if "out_within_tol" not in record and "grad_within_tol" not in record:
        return None
    if not record.get("out_within_tol", True):
        return "FAIL"
    if record.get("grad_within_tol", True):
        return "OK"
    if record["provider"] == "naive":
        # plain PyTorch is what the gradient rule measures against: not a failure of its own
        return "baseline (grads beyond TOLERANCES)"
    naive_err = None if naive is None or naive is record else naive.get("grad_err")
    if naive_err is not None and record["grad_err"] <= error_bound(naive_err, ERROR_RATIO_GRAD, DTYPES[record["dtype"]]):
        return f"OK (grads <= {ERROR_RATIO_GRAD:g}x naive)"
    return "FAIL"


def add_derived(records: list[dict], env: dict) -> None:
    """match, time_vs_naive (provider time / naive time: below 1 is faster), mem_vs_naive
    (provider peak / naive peak), spread and unstable, and on CUDA tflops and pct_of_bound, in place."""
    naive = {record_key({**r, "provider": "naive"}): r for r in records
             if r["provider"] == "naive" and r["status"] == "ok"}
    for r in records:
        r.setdefault("time_vs_naive", None)
        r.setdefault("mem_vs_naive", None)
        r.setdefault("tflops", None)
        r.setdefault("pct_of_bound", None)
        if r["status"] != "ok":
            continue
        if r.get("q25_s") is not None and r.get("q75_s") is not None:
            r["spread"] = spread(r["q25_s"], r["median_s"], r["q75_s"])
            r["unstable"] = is_unstable(r["spread"])
        base = naive.get(record_key({**r, "provider": "naive"}))
        r["match"] = _match(r, base)
        if base is not None:
            r["time_vs_naive"] = r["median_s"] / base["median_s"]
            if min(base.get("peak_bytes") or 0, r.get("peak_bytes") or 0) >= _MIN_PEAK_FOR_RATIO:
                r["mem_vs_naive"] = r["peak_bytes"] / base["peak_bytes"]
        if env.get("device_type") == "cuda":
            r["tflops"] = r["flops"] / r["median_s"] / 1e12
            bound = _bound_seconds(r, env)
            r["pct_of_bound"] = 100 * bound / r["median_s"] if bound else None


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(records: list[dict], env: dict, compact: bool = False) -> str:
    """The results table. compact: the README's columns (time, memory, ratios, match)."""
    gpu = env.get("device_type") == "cuda"
    head = ["site", "B", "dtype", "dir", "provider", "median ms", "spread", "IQR ms", "peak MiB",
            "time vs naive", "memory vs naive", "max err", "match"]
    if compact:
        head = ["site", "B", "dtype", "dir", "provider", "median ms", "spread", "peak MiB", "time vs naive",
                "memory vs naive", "match"]
    if gpu and not compact:
        head += ["TFLOP/s", "% bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in records:
        provider = r["provider"]
        if provider == "fastattn" and r.get("backend"):  # automatic choice: say which backend ran
            provider = f"fastattn ({r['backend']})"
        row = [r["shape"], str(r["B"]), r["dtype"], r["direction"], provider]
        if r["status"] != "ok":
            text = f"{r['status']}: {r['reason']}"
            row += [text] + [""] * (len(head) - len(row) - 1)
        else:
            peak = r.get("peak_bytes")
            iqr = f"{_ms(r['q25_s'])}-{_ms(r['q75_s'])}"
            time_ratio = _fmt(r.get("time_vs_naive"), ".2f")
            mem = _fmt(r.get("mem_vs_naive"), ".2f")
            value = r.get("spread")
            spread_text = "-" if value is None else f"±{50 * value:.0f}%" + (" UNSTABLE" if is_unstable(value) else "")
            cells = {"median ms": _ms(r["median_s"]), "spread": spread_text, "IQR ms": iqr,
                     "peak MiB": ("error" if r.get("memory_error") else
                                  _fmt(None if peak is None else peak / 2**20, ".1f")),
                     "time vs naive": time_ratio, "memory vs naive": mem, "max err": _fmt(r.get("max_err"), ".2e"),
                     "match": r.get("match") or "-", "TFLOP/s": _fmt(r.get("tflops"), ".1f"),
                     "% bound": _fmt(r.get("pct_of_bound"), ".0f")}
            row += [cells[h] for h in head[5:]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, env: dict, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "records": records}, indent=1) + "\n")


def load_json(path: str | os.PathLike, option: str = "--compare") -> dict:
    """A file written by --json; raises ValueError naming `option` and what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"{option}: cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{option}: {path} is not JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list) or "env" not in data:
        raise ValueError(f"{option}: {path} is not a `fastattn bench --json` file: expected an object "
                         f"with 'env' and a 'records' list, got {type(data).__name__} with keys {list(data)[:5] if isinstance(data, dict) else '-'}")
    return data


def is_slower(new: dict, old: dict, ratio: float = BENCH_REGRESSION_RATIO) -> bool:
    """Significant slowdown: the median grew past `ratio` and the interquartile ranges do not
    overlap (the new run's fast quarter is slower than the old run's slow quarter)."""
    return new["median_s"] > ratio * old["median_s"] and new["q25_s"] > old["q75_s"]


def compare(old: dict, records: list[dict], ratio: float = BENCH_REGRESSION_RATIO) -> tuple[str, list[str]]:
    """(markdown table of the change per case, list of regressions). A regression is a
    significant slowdown, a case that ran before and no longer runs, or a match that went from OK
    to FAIL. Every one counts."""
    previous = {record_key(r): r for r in old["records"] if isinstance(r, dict)}
    lines = ["| site | B | dtype | dir | provider | old ms | new ms | change | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    regressions: list[str] = []
    compared = 0
    for r in records:
        name = f"{r['shape']} B={r['B']} {r['dtype']} {r['direction']} {r['provider']}"
        o = previous.pop(record_key(r), None) or _same_case_other_batch(previous, r)
        old_ms = new_ms = change = ""
        if o is None:
            verdict = "new case"
        elif o.get("status") != "ok" and r["status"] != "ok":
            verdict = f"still {r['status']}"
        elif r["status"] != "ok":
            verdict = f"REGRESSION: was ok, now {r['status']}: {r['reason']}"
            regressions.append(f"{name}: {verdict}")
        elif o.get("status") != "ok":
            verdict, new_ms = "now runs", _ms(r["median_s"])
        else:
            compared += 1
            old_ms, new_ms = _ms(o["median_s"]), _ms(r["median_s"])
            change = f"{100 * (r['median_s'] / o['median_s'] - 1):+.0f}%"
            verdict = "same (within noise)"
            if is_slower(r, o, ratio):
                verdict = f"REGRESSION: slower by more than {100 * (ratio - 1):.0f}%"
                regressions.append(f"{name}: {change} ({old_ms} ms -> {new_ms} ms)")
            elif is_slower(o, r, ratio):
                verdict = "faster"
            if (o.get("match") or "").startswith("OK") and r.get("match") == "FAIL":
                verdict += "; REGRESSION: match OK -> FAIL"
                regressions.append(f"{name}: match OK -> FAIL (max err {r.get('max_err')})")
        lines.append(f"| {r['shape']} | {r['B']} | {r['dtype']} | {r['direction']} | {r['provider']} | "
                     f"{old_ms} | {new_ms} | {change} | {verdict} |")
    for o in previous.values():
        lines.append(f"| {o.get('shape')} | {o.get('B')} | {o.get('dtype')} | {o.get('direction')} | "
                     f"{o.get('provider')} | | | | not run this time |")
    if records and compared == 0:
        regressions.append("no case was timed in both runs (other sites, dtypes, directions or providers): "
                           "nothing was compared, so no regression could be ruled out")
    return "\n".join(lines), regressions


def _same_case_other_batch(previous: dict, r: dict) -> dict | None:
    """The old record of this case at another batch size (presets scale B to the free memory),
    with its times scaled to r's batch: time per sample is what is compared then."""
    for key, o in previous.items():
        if (o.get("shape"), o.get("dtype"), o.get("direction"), o.get("provider")) == (
                r["shape"], r["dtype"], r["direction"], r["provider"]) and o.get("B"):
            del previous[key]
            factor = r["B"] / o["B"]
            scaled = {**o, "B": r["B"]}
            for field in ("median_s", "q25_s", "q75_s"):
                if isinstance(o.get(field), (int, float)):
                    scaled[field] = o[field] * factor
            return scaled
    return None
