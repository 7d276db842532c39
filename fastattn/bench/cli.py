"""Argument parsing and the run loop of `fastattn bench`."""
from __future__ import annotations

import argparse
import gc
import os
import sys

from ..argtypes import number_type
from .presets import DIRECTIONS, DTYPE_ALIASES, DTYPES, PENALTY_DIRECTION, PRESETS

TRAIN_STEP = "train-step"

__all__ = ["main", "parse_args", "run"]


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


POSITIVE_INT = number_type(int, strict=True)
SECONDS = number_type(float, what="a number of seconds >= 0")


def build_parser() -> argparse.ArgumentParser:
    from .providers import ALL_PROVIDERS

    p = argparse.ArgumentParser(
        prog="fastattn bench",
        description="Benchmark naive attention, SDPA and fastattn on the attention sites of GAN configs "
                    "(time, peak memory, time / naive time, accuracy against an fp64 reference). Without --json "
                    "and --markdown, writes both to a results file named on the last line.")
    p.add_argument("--preset", default="default", choices=(*PRESETS, TRAIN_STEP),
                   help="default: `gan` on CUDA, `quick` on CPU. quick: three small sites, B=1 (CI-sized). "
                        "gan: every site, batch scaled to the device. stress: the high-resolution sites, B=1. "
                        "batches: every gan site at B = 1, 2, 8, 32, 128, 256 (as far as the device allows). "
                        "train-step: one whole G+D training step of the reference GAN (fastattn.models) with "
                        "attention at half resolution, naive layers vs fastattn (--resolution, --ch, --batch)")
    p.add_argument("--resolution", action="append", metavar="PX[,PX]",
                   help="train-step: image resolutions, powers of two >= 16 (default 128,256)")
    p.add_argument("--ch", type=POSITIVE_INT, default=None,
                   help="train-step: the GAN's base width (default 16; BigGAN uses 96)")
    p.add_argument("--shape", action="append", metavar="ID[,ID]",
                   help="only these site ids from gan_shapes.json (may name sites outside the preset)")
    p.add_argument("--custom", metavar="N=..,M=..,d_qk=..,d_v=..[,B=..]",
                   help="one custom site instead of the preset's sites")
    p.add_argument("--dtype", action="append", metavar="DTYPE[,DTYPE]",
                   help=f"{', '.join(DTYPES)} (default: float32 on CPU, bfloat16 and float16 on CUDA)")
    p.add_argument("--direction", action="append", metavar="DIR[,DIR]",
                   help=f"{', '.join(DIRECTIONS)}; fwd is an inference forward, bwd the backward alone, "
                        f"{PENALTY_DIRECTION} a gradient-penalty step (backward of |dq|^2+|dk|^2+|dv|^2)")
    p.add_argument("--provider", action="append", metavar="NAME[,NAME]",
                   help=f"{', '.join(ALL_PROVIDERS)} (default on CPU: naive, sdpa, fastattn; "
                        "on CUDA: all)")
    p.add_argument("--batch", type=POSITIVE_INT, help="use this batch size for every site")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--repeats", type=POSITIVE_INT, default=None,
                   help="most timed repeats per case (default BENCH_CPU_MAX_REPEATS = 2000 on CPU, 100 on CUDA); "
                        "--min-time decides how long a case is timed below that")
    p.add_argument("--min-repeats", type=POSITIVE_INT, default=3)
    p.add_argument("--min-time", type=SECONDS, default=None,
                   help="keep repeating until this many seconds are spent (default 0.5 CPU, 0.2 CUDA)")
    p.add_argument("--threads", type=POSITIVE_INT,
                   help="torch CPU threads (default on CPU: BENCH_CPU_THREADS in fastattn/constants.py, 1: "
                        "on a CPU shared with other work more threads wait for each other at every op and "
                        "timings turn bimodal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check against fp64")
    p.add_argument("--json", metavar="PATH", help='write {"env": ..., "records": [...]} here')
    p.add_argument("--markdown", metavar="PATH", help="write the README's table (machine named) here")
    p.add_argument("--plots", metavar="DIR", help="write time/memory-vs-size and time-vs-naive PNGs here")
    p.add_argument("--compare", metavar="OLD.json", help="print the change per case against this --json file")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="with --compare: exit 1 on any significant slowdown or newly failing case")
    p.add_argument("--regression-ratio", type=float, default=None, metavar="R",
                   help="with --compare: a slowdown counts when the median grew more than R times and the "
                        "interquartile ranges do not overlap (default BENCH_REGRESSION_RATIO in "
                        "fastattn/constants.py; re-derive it for your machine with benchmarks/measure_noise.py)")
    p.add_argument("--from-json", metavar="PATH",
                   help="run nothing: take env and records from this --json file and write the table, "
                        "--markdown, --plots and --compare from them (e.g. the README's from committed results)")
    p.add_argument("--note", metavar="TEXT", help="a remark about the machine or run, kept in the JSON "
                   "environment and printed with the markdown table (e.g. 'shared machine, load 7')")
    p.add_argument("--list", action="store_true", help="print the cases and providers, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def parse_args(argv: list[str]):
    """Parsed and checked arguments; exits with status 2 and a message naming the argument."""
    from .presets import parse_custom
    from .providers import ALL_PROVIDERS
    from ..shapes import gan_shapes

    parser = build_parser()
    args = parser.parse_args(argv)
    args.shape, args.dtype = _split(args.shape), _split(args.dtype)
    args.direction, args.provider = _split(args.direction), _split(args.provider)
    known_ids = [s.id for s in gan_shapes()]
    for shape_id in args.shape or []:
        if shape_id not in known_ids:
            parser.error(f"--shape must name sites from gan_shapes.json ({', '.join(known_ids)}), got {shape_id!r}")
    if args.dtype:
        args.dtype = [DTYPE_ALIASES.get(d, d) for d in args.dtype]
        for dtype in args.dtype:
            if dtype not in DTYPES:
                parser.error(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for direction in args.direction or []:
        if direction not in DIRECTIONS:
            parser.error(f"--direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    for provider in args.provider or []:
        if provider not in ALL_PROVIDERS:
            parser.error(f"--provider must be one of {', '.join(ALL_PROVIDERS)}, got {provider!r}")
    if args.preset == TRAIN_STEP:
        for option, value in (("--shape", args.shape), ("--custom", args.custom), ("--dtype", args.dtype),
                              ("--direction", args.direction), ("--provider", args.provider),
                              ("--compare", args.compare), ("--plots", args.plots)):
            if value:
                parser.error(f"--preset {TRAIN_STEP} times a whole training step (naive layers vs fastattn, "
                             f"fp32): {option} does not apply to it")
        raw = _split(args.resolution) or []
        if not all(r.isdigit() and int(r) >= 16 and not int(r) & (int(r) - 1) for r in raw):
            parser.error(f"--resolution must be powers of two >= 16 (e.g. 128,256), got {','.join(raw)!r}")
        args.resolution = [int(r) for r in raw] or None
    elif args.resolution or args.ch:
        parser.error(f"--resolution and --ch apply to --preset {TRAIN_STEP} only")
    if args.custom is not None:
        if args.shape:
            parser.error("--custom and --shape cannot be combined: --custom replaces the preset's sites")
        try:
            args.custom = parse_custom(args.custom)
        except ValueError as error:
            parser.error(str(error))
    if args.fail_on_regression and not args.compare:
        parser.error("--fail-on-regression needs --compare OLD.json (the run to compare against)")
    if args.regression_ratio is not None and not args.regression_ratio >= 1.0:
        parser.error(f"--regression-ratio must be a number >= 1 (a slowdown factor), got {args.regression_ratio}")
    if args.min_repeats and args.repeats and args.min_repeats > args.repeats:
        parser.error(f"--min-repeats ({args.min_repeats}) must not exceed --repeats ({args.repeats})")
    from .report import load_json

    for option, path in (("--compare", args.compare), ("--from-json", args.from_json)):
        if path:
            try:
                setattr(args, "old" if option == "--compare" else "loaded", load_json(path, option))
            except ValueError as error:
                parser.error(str(error))
    return args


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastattn bench: error: --device cuda was requested but torch.cuda.is_available() is False")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice, 0) if choice == "cuda" else torch.device("cpu")


def _free_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def _record(case, provider: str, **fields) -> dict:
    s = case.site
    record = {"shape": s.id, "B": s.B, "N": s.N, "M": s.M, "d_qk": s.d_qk, "d_v": s.d_v,
              "config_B": s.config_B, "scale": s.scale, "batch_note": s.batch_note, "dtype": case.dtype,
              "direction": case.direction, "provider": provider, "status": "ok", "reason": None,
              "median_s": None, "q25_s": None, "q75_s": None, "n_repeats": 0, "peak_bytes": None,
              "max_err": None, "match": None, "flops": case.flops()}
    record.update(fields)
    return record


def _error_record(case, provider: str, error: BaseException) -> dict:
    import torch

    from .providers import NotSupported

    if isinstance(error, NotSupported):
        return _record(case, provider, status="not supported", reason=str(error))
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return _record(case, provider, status="error", reason=f"out of memory: {str(error).splitlines()[0]}")
    return _record(case, provider, status="error", reason=f"{type(error).__name__}: {error}")


def _run_case(case, providers: list[str], inputs, reference, device, args, free_bytes) -> list[dict]:
    """One record per provider. On a CPU the providers are timed interleaved, round by round
    (measure.time_interleaved), so load from other work hits them alike; on CUDA one after
    another. Then per provider: accuracy, and peak memory (CPU: each in a fresh process)."""
    import torch

    from . import measure
    from .providers import chosen_backend, make_provider, skip_reason

    records: dict[str, dict] = {}
    calls: dict[str, tuple] = {}
    for provider in providers:
        why = skip_reason(provider, case, device, free_bytes)
        if why:
            records[provider] = _record(case, provider, status="not supported", reason=why)
            continue
        try:
            calls[provider] = measure.make_call(make_provider(provider), case.direction, inputs, case.site.scale)
        except Exception as error:
            records[provider] = _error_record(case, provider, error)
    groups = [list(calls)] if device.type == "cpu" else [[p] for p in calls]
    for group in groups:
        outcomes = measure.time_interleaved({p: calls[p] for p in group}, device, args.min_time,
                                            args.min_repeats, args.repeats)
        for provider, outcome in outcomes.items():
            if isinstance(outcome, BaseException):
                records[provider] = _error_record(case, provider, outcome)
                continue
            timing, first = outcome
            record = _record(case, provider, median_s=timing.median_s, q25_s=timing.q25_s, q75_s=timing.q75_s,
                             n_repeats=timing.n_repeats,
                             backend=chosen_backend(provider, inputs.q, inputs.k, inputs.v))
            if reference is not None:
                record.update(measure.accuracy(first, reference, case.direction, case.dtype))
            records[provider] = record
        del outcomes
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for provider in calls:
        record = records[provider]
        if args.no_memory or record["status"] != "ok":
            continue
        try:
            if device.type == "cuda":
                record["peak_bytes"] = measure.peak_bytes_cuda(*calls[provider], device)
            else:
                record["peak_bytes"] = measure.peak_bytes_cpu(case.site, case.dtype, case.direction, provider,
                                                              args.seed, case.site.scale, threads=torch.get_num_threads())
        except Exception as error:
            record["memory_error"] = f"{type(error).__name__}: {error}"
    return [records[p] for p in providers]


def _prepare(args):
    """The device, with threads, repeats and minimum time defaulted for it."""
    device = _device(args.device)
    if device.type == "cpu" and "fastattn-triton" in (args.provider or []):
        # Triton runs on CPU tensors only under its interpreter, set before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.threads is None and device.type == "cpu":
        from ..constants import BENCH_CPU_THREADS

        args.threads = BENCH_CPU_THREADS
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        from ..constants import BENCH_CPU_MAX_REPEATS

        args.repeats = 100 if device.type == "cuda" else BENCH_CPU_MAX_REPEATS
    args.min_repeats = min(args.min_repeats, args.repeats)
    if args.min_time is None:
        args.min_time = 0.2 if device.type == "cuda" else 0.5
    return device


def _timing_text(args, device, what: str) -> str:
    from ..constants import BENCH_MAX_TIME_FACTOR, BENCH_STABLE_SPREAD

    return (("CUDA events, L2 flushed; " if device.type == "cuda" else "time.perf_counter; ") + what
            + f"; median of {args.min_repeats}-{args.repeats} repeats, at least {args.min_time} s, more "
            f"(up to {BENCH_MAX_TIME_FACTOR}x the time) while the spread (IQR / median) is over "
            f"{BENCH_STABLE_SPREAD:.0%}; 1 warm-up")


def run(args) -> tuple[dict, list[dict]]:
    """Run every (case, provider); returns (env, records)."""
    device = _prepare(args)
    import torch

    from . import measure
    from .presets import build_cases
    from .providers import default_providers
    from .report import environment

    free_bytes = _free_bytes(device)
    cases, preset = build_cases(args.preset, device, free_bytes, args.shape, args.dtype, args.direction,
                                args.batch, args.custom)
    providers = args.provider or default_providers(device)
    env = environment(device)
    from .presets import over_cpu_work_cap

    left_out = (over_cpu_work_cap() if preset == "gan" and device.type == "cpu" and not args.shape
                and args.custom is None else [])
    env.update(preset=preset, providers=providers, seed=args.seed, left_out=left_out,
               free_memory_bytes_at_start=free_bytes,
               timing=_timing_text(args, device, "providers one after another" if device.type == "cuda" else
                                   "providers interleaved, one repeat each per round (naive, sdpa, fastattn, "
                                   "naive, ...), the same number of rounds for all"),
               memory_method=None if args.no_memory else (
                   "torch.cuda.max_memory_allocated beyond the inputs" if device.type == "cuda"
                   else "VmHWM - VmRSS in a fresh forked process, after a warm-up run"))
    if args.list:
        return env, [_record(c, p, status="listed") for c in cases for p in providers]
    if not args.no_memory and device.type == "cpu":
        env["cpu_memory_noise_floor_bytes"] = measure.cpu_noise_floor(threads=torch.get_num_threads())
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        tqdm = None
    total = len(cases) * len(providers)
    bar = tqdm(total=total, file=sys.stderr, disable=args.no_progress, unit="case") if tqdm else None
    records, reference_cache = [], {}
    for case in cases:
        inputs = measure.make_inputs(case.site, case.dtype, device, args.seed)
        reference = None
        if not args.no_check:
            key = (case.site, case.dtype)
            if key not in reference_cache:
                reference_cache.clear()  # cases of one site and dtype are consecutive
                need_grads = any(c.direction != "fwd" for c in cases if (c.site, c.dtype) == key)
                reference_cache[key] = measure.reference_results(inputs, case.site.scale, need_grads)
                if any(c.direction == PENALTY_DIRECTION for c in cases if (c.site, c.dtype) == key):
                    reference_cache[key] += (measure.reference_penalty_grads(inputs, case.site.scale),)
            reference = reference_cache[key]
        if bar is not None:
            bar.set_description(f"{case.site.id} {case.dtype} {case.direction}")
        records.extend(_run_case(case, providers, inputs, reference, device, args, free_bytes))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if bar is not None:
            bar.update(len(providers))
        del inputs, reference
    if bar is not None:
        bar.close()
    return env, records


def _print_header(env: dict, records: list[dict]) -> None:
    from ..constants import BENCH_STABLE_SPREAD
    from .report import machine_line

    print(f"fastattn bench, preset {env['preset']}: {machine_line(env)}")
    if env["preset"] == "gan" and env["device_type"] == "cpu" and env.get("left_out"):
        print(f"  left out on CPU (B=1 is over the CPU work cap; see --preset stress): {', '.join(env['left_out'])}")
    notes = sorted({f"{r['shape']}: {r['batch_note']}" for r in records if r.get("batch_note")})
    for note in notes:
        print(f"  batch {note}")
    unstable = [r for r in records if r.get("unstable")]
    if unstable:
        print(f"  WARNING: {len(unstable)} of {sum(r['status'] == 'ok' for r in records)} timings stayed UNSTABLE "
              "(spread over the target when their repeats ran out): the machine is busy or throttling; "
              "compare only ratios measured side by side, or rerun when it is quiet")
    if env.get("cpu_memory_noise_floor_bytes") is not None:
        print(f"  peak memory: {env['memory_method']}; noise floor {env['cpu_memory_noise_floor_bytes'] / 2**10:.0f} KiB")
    print("  time vs naive = provider time / naive time (below 1: faster); memory vs naive = provider peak / "
          f"naive peak; spread = +-half the IQR over the median, UNSTABLE above +-{50 * BENCH_STABLE_SPREAD:.0f}%; "
          "max err: vs fp64 fastattn.reference; match: output within fastattn.constants.TOLERANCES, "
          "gradients within them or within ERROR_RATIO_GRAD x naive's gradient error (fp32 gradients "
          "summed over thousands of queries exceed the elementwise tolerances even for naive)")


def main(argv: list[str] | None = None) -> int:
    from . import report

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.preset == TRAIN_STEP or (args.from_json and args.loaded["env"].get("preset") == TRAIN_STEP):
        return _train_step_main(args)
    if args.from_json:
        env, records = args.loaded["env"], args.loaded["records"]
    else:
        env, records = run(args)
    if args.note:
        env["note"] = args.note
    if args.list:
        for r in records:
            print(f"{r['shape']} B={r['B']} {r['dtype']} {r['direction']} {r['provider']}"
                  + (f"  [{r['batch_note']}]" if r["batch_note"] else ""))
        return 0
    report.add_derived(records, env)
    _print_header(env, records)
    print(report.markdown_table(records, env))
    default_results = _write_results(args, env, records, env["preset"],
                                      report.markdown_table(records, env, compact=True))
    if args.plots:
        from .plots import write_plots

        for path in write_plots(records, env, args.plots):
            print(f"wrote {path}")
    status = 0
    if args.compare:
        from ..constants import BENCH_REGRESSION_RATIO

        ratio = args.regression_ratio or BENCH_REGRESSION_RATIO
        table, regressions = report.compare(args.old, records, ratio)
        print(f"\nchange against {args.compare}:")
        print(table)
        if regressions:
            print(f"\n{len(regressions)} regression(s):\n  " + "\n  ".join(regressions))
            if args.fail_on_regression:
                status = 1
        else:
            print("\nno regressions")
    if default_results:
        print(f"results: {args.json} and {args.markdown} ({report.machine_line(env)})")
    return status


def _train_step_main(args) -> int:
    """`--preset train-step` (or --from-json of its results): run, print, write."""
    from . import report, train_step

    if args.from_json:
        env, records = args.loaded["env"], args.loaded["records"]
    else:
        device = _prepare(args)
        settings = [train_step.StepSetting(r, ch=args.ch or train_step.DEFAULT_CH,
                                           batch=args.batch or train_step.DEFAULT_BATCH, seed=args.seed)
                    for r in args.resolution or train_step.DEFAULT_RESOLUTIONS]
        env = report.environment(device)
        env.update(preset=TRAIN_STEP, providers=list(train_step.VARIANTS), seed=args.seed,
                   setting="fastattn.models Generator + Discriminator, unconditional, attention in both at "
                           "resolution / 2 (2x2-pooled keys/values, d_qk = C/8, d_v = C/2, gamma 0.5), "
                           "GANTrainer.train_step (1 D hinge update + 1 G update, Adam), fp32",
                   timing=_timing_text(args, device, "naive and fastattn steps interleaved (naive, fastattn, "
                                       "naive, ...), the same number of rounds for both"),
                   memory_method=None if args.no_memory else (
                       "torch.cuda.max_memory_allocated over one step beyond what is allocated before it"
                       if device.type == "cuda" else "VmHWM - VmRSS over one step in a fresh forked process, "
                       "after a warm-up step (the step's own working memory; resident_before_bytes: what "
                       "was resident before it)"))
        if args.list:
            for setting in settings:
                n, m = setting.attention_sizes()
                print(f"train step {setting.resolution} px, attention at {setting.attn_resolution}x"
                      f"{setting.attn_resolution} (N={n}, M={m}), B={setting.batch}, ch={setting.ch}: "
                      + ", ".join(train_step.VARIANTS))
            return 0
        records = train_step.run(settings, device, args)
    if args.note:
        env["note"] = args.note
    train_step.add_derived(records)
    table = train_step.markdown_table(records)
    print(f"fastattn bench, preset {TRAIN_STEP}: {report.machine_line(env)}")
    print(f"  {env['setting']}\n  timing: {env['timing']}\n  memory: {env['memory_method']}")
    print(table)
    default_results = _write_results(args, env, records, TRAIN_STEP, f"{env['setting']}.\n\n{table}")
    if default_results:
        print(f"results: {args.json} and {args.markdown} ({report.machine_line(env)})")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def _write_results(args, env: dict, records: list, preset: str, body: str) -> bool:
    """Write --json and --markdown (a header naming the machine, then `body`); with neither
    given (and no --from-json), both go to the default results files. Returns whether they did."""
    from . import report

    default_results = not (args.json or args.markdown or args.from_json)
    if default_results:
        args.json, args.markdown = _default_results_paths(env)
    if args.json:
        report.write_json(args.json, env, records)
        print(f"wrote {args.json}")
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(
            f"Machine: {report.machine_line(env)}; {env['date']}, fastattn {env['fastattn']} "
            f"({env.get('git_commit')}), preset {preset}."
            + (f" Note: {env['note']}." if env.get("note") else "") + f"\n\n{body}\n")
        print(f"wrote {args.markdown}")
    return default_results


def _default_results_paths(env: dict) -> tuple[str, str]:
    """fastattn-bench-results/<preset>-<device>-<UTC time>.{json,md} under the working directory."""
    stamp = env["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = os.path.join("fastattn-bench-results", f"{env['preset']}-{env['device_type']}-{stamp}")
    return stem + ".json", stem + ".md"
