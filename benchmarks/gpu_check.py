"""The Python steps of benchmarks/gpu_check.sh (one timed run on one GPU); each also runs alone.

    python benchmarks/gpu_check.py warm [--jobs 14] [--scope bench,candidates] [--dry-run]
        compile every autotuning candidate of the Triton kernels for the shapes the run uses, in
        several processes at once (each compiles a disjoint slice of the distinct launches);
        Triton's on-disk cache (~/.triton/cache) then serves every later process. Usable on its
        own to pay a new shape's compile cost ahead of a training run.
    python benchmarks/gpu_check.py candidates [--tiny] [--json PATH]
        every autotuning candidate, forward and backward, against an fp64 reference at aligned
        and ragged GAN-size shapes (d_v 300 and 1024 included), by the project's accuracy rule.
        --tiny: one small ragged shape, which runs on CPU under TRITON_INTERPRET=1.
    python benchmarks/gpu_check.py profile [--shape biggan128_G] [--batch 8]
        autotune the bench sites, print the tuned winners, then a torch.profiler breakdown of
        one site's forward+backward per kernel.
    python benchmarks/gpu_check.py dispatch
        which backend automatic dispatch picks at each GAN site (batch 1) on this machine.

Without a CUDA device, warm/profile print the plan and say "no CUDA device" (exit 77, which
gpu_check.sh reports as SKIP); candidates needs --tiny and TRITON_INTERPRET=1 there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CUDA = 77  # exit status (the automake convention for "skipped"): nothing to do without a GPU (gpu_check.sh prints SKIP)

# The sites `fastattn bench` runs in gpu_check.sh, with their batch sizes.
BENCH_SITES = {"biggan128_G": 8, "sagan64_unpooled_G": 8, "biggan256_G128": 1, "stress_unpooled128": 1}
BENCH_DTYPES = ("bfloat16", "float16")
# Candidate-check shapes: (label, N, M, d_qk, d_v, dtypes). Aligned = N, M multiples of 16 (the
# launch specialises divisibility by 16: vectorised, pipelined loads); ragged = not.
CANDIDATE_SHAPES = (
    ("biggan128_G aligned", 4096, 1024, 24, 96, ("bfloat16", "float16")),
    ("biggandeep256 aligned", 4096, 1024, 64, 256, ("bfloat16",)),
    ("wide d_v 1024 aligned", 1024, 1024, 128, 1024, ("bfloat16",)),
    ("ragged d_v 300", 4093, 1021, 24, 300, ("bfloat16", "float16")),
    ("ragged d_v 1024", 1021, 1019, 20, 1024, ("bfloat16",)),
)
TINY_SHAPES = (("tiny ragged d_v 300", 20, 9, 10, 300, ("float32",)),)


def _cuda():
    import torch

    return torch.cuda.is_available()


def _dtype(name):
    import torch

    return getattr(torch, name)


# --------------------------------------------------------------------------------------- warm
def _site_dims(site):
    from fastattn.shapes import gan_shape

    s = gan_shape(site)
    return s.N, s.M, s.d_qk, s.d_v


def warm_shapes(scope):
    """(N, M, d_qk, d_v, dtype name) of every shape the run will launch the kernels at."""
    shapes = []
    if "bench" in scope:
        shapes += [(*_site_dims(site), dt) for site in BENCH_SITES for dt in BENCH_DTYPES]
    if "candidates" in scope:
        shapes += [(n, m, dq, dv, dt) for _, n, m, dq, dv, dts in CANDIDATE_SHAPES for dt in dts]
    return list(dict.fromkeys(shapes))


def _candidates(n, m, d_qk, d_v, dtype, shared):
    from fastattn.kernels.configs import backward_candidates, forward_candidates, tables

    elem = dtype.itemsize
    fwd_table, bwd_table, fixed_fwd, fixed_bwd = tables(elem)
    fwd = forward_candidates(list(fwd_table) + [fixed_fwd], n, m, d_qk, d_v, elem, shared_bytes=shared)
    bwd = backward_candidates(list(bwd_table) + [fixed_bwd], n, m, d_qk, d_v, elem, shared_bytes=shared)
    return fwd, bwd


def warm_plan(scope, device, shared, arch):
    """Distinct launches (deduplicated as the JIT would: same kernel, specialisation, options)
    of every candidate at every shape, in a fixed order, recorded on `device` tensors (batch 1)."""
    from fastattn.kernels.offline_compile import launch_key, record_launches

    plan, seen = [], set()
    for n, m, d_qk, d_v, dt in warm_shapes(scope):
        dtype = _dtype(dt)
        fwd, bwd = _candidates(n, m, d_qk, d_v, dtype, shared)
        for launch in record_launches(n, m, d_qk, d_v, dtype, fwd, bwd, batch=1, device=device):
            try:
                key = launch_key(launch, arch)
            except Exception:  # another Triton's binder: dedupe on what the launch names
                key = repr((launch.kernel.__name__, [getattr(a, "shape", a) for a in launch.args],
                            sorted(launch.kwargs.items())))
            if key not in seen:
                seen.add(key)
                tiles = {k: v for k, v in launch.kwargs.items() if k.startswith(("BLOCK", "ATOMIC", "num_"))}
                plan.append((launch, f"{launch.kernel.__name__} N={n} M={m} d_qk={d_qk} d_v={d_v} {dt} {tiles}"))
    return plan


def _compile_one(launch):
    kernel = launch.kernel
    warmup = getattr(kernel, "warmup", None)
    if warmup is not None:  # compiles (and caches) without launching
        warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    else:
        kernel[launch.grid](*launch.args, **launch.kwargs)


def cmd_warm(args):
    scope = args.scope.split(",")
    cuda = _cuda()
    if args.worker is not None:
        import torch

        props = torch.cuda.get_device_properties(0)
        plan = warm_plan(scope, "cuda", props.shared_memory_per_block_optin, props.major * 10 + props.minor)
        failed = 0
        for index, (launch, label) in enumerate(plan):
            if index % args.of != args.worker:
                continue
            start = time.perf_counter()
            try:
                _compile_one(launch)
                print(f"[w{args.worker}] {time.perf_counter() - start:5.1f}s {label}", flush=True)
            except Exception as error:
                failed += 1
                print(f"[w{args.worker}] FAILED {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        torch.cuda.synchronize()
        return 1 if failed else 0
    shared, arch = (227 * 1024, 90)
    if cuda:
        import torch

        props = torch.cuda.get_device_properties(0)
        shared, arch = props.shared_memory_per_block_optin, props.major * 10 + props.minor
    plan = warm_plan(scope, "meta", shared, arch)
    print(f"warm: {len(plan)} distinct kernel launches at {len(warm_shapes(scope))} (shape, dtype) pairs "
          f"for sm_{arch}, shared memory {shared} B, in {args.jobs} processes")
    if args.dry_run or not cuda:
        for _, label in plan[: 12 if not args.verbose else None]:
            print("  ", label)
        if not args.verbose and len(plan) > 12:
            print(f"   ... {len(plan) - 12} more (--verbose lists all)")
        if not cuda and not args.dry_run:
            print("warm: no CUDA device: nothing compiled (the plan above is what a GPU run compiles)")
            return NO_CUDA
        return 0
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "warm", "--scope", args.scope,
                               "--worker", str(i), "--of", str(args.jobs)], env=env)
             for i in range(args.jobs)]
    codes = [p.wait() for p in procs]
    print(f"warm: {len(plan)} launches compiled in {time.perf_counter() - start:.1f} s wall, "
          f"{sum(c != 0 for c in codes)} of {args.jobs} workers reported failures")
    return 1 if any(codes) else 0


# --------------------------------------------------------------------------------- candidates
def _grads_run(q, k, v, grad_out, grad_lse):
    from fastattn.reference import reference_attention

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, return_lse=True)
    import torch

    torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def check_candidates(label, n, m, d_qk, d_v, dtype_name, device, seed=0, prune=True):
    """Rows (one per candidate) of error / bound per output; every fwd candidate, then every
    bwd candidate on the fixed forward's out and stats."""
    import torch

    from fastattn.constants import ERROR_RATIO_GRAD, ERROR_RATIO_OUT
    from fastattn.kernels.backward import launch_backward
    from fastattn.kernels.configs import backward_candidates, forward_candidates, pad_width, tables
    from fastattn.kernels.forward import launch_forward
    from fastattn.testing import error_bound, max_abs_error

    dtype = _dtype(dtype_name)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, c, length, device=device, generator=gen).to(dtype)
               for c, length in ((d_qk, n), (d_qk, m), (d_v, m)))
    grad_out = torch.randn(1, d_v, n, device=device, generator=gen).to(dtype)
    grad_lse = torch.randn(1, n, device=device, generator=gen)
    want = _grads_run(q.double(), k.double(), v.double(), grad_out.double(), grad_lse.double())
    naive = _grads_run(q, k, v, grad_out, grad_lse)
    names = ("out", "lse", "dq", "dk", "dv")
    bounds = [error_bound(max_abs_error(nv, w), r, dtype)
              for nv, w, r in zip(naive, want, [ERROR_RATIO_OUT] * 2 + [ERROR_RATIO_GRAD] * 3)]
    elem = q.element_size()
    fwd_table, bwd_table, fixed_fwd, _ = tables(elem)
    shared = torch.cuda.get_device_properties(device).shared_memory_per_block_optin if device != "cpu" else None
    d_pad, dv_pad = pad_width(d_qk), pad_width(d_v)
    rows = []

    def forward(config):
        out = torch.full((1, d_v, n), float("nan"), device=device, dtype=dtype)  # poisoned
        lse = torch.full((1, n), float("nan"), device=device)
        stats = torch.full((1, 2, n), float("nan"), device=device)
        launch_forward(lambda f: f, q, k, v, out, lse, stats, 1.0, "ieee", config, d_pad)
        return out, lse, stats

    def row(kind, config, got, wanted, bnds, outputs):
        errors = {name: max_abs_error(g, w) for name, g, w in zip(outputs, got, wanted)}
        ratios = {name: errors[name] / b for name, b in zip(outputs, bnds)}
        ok = all(g.isfinite().all().item() for g in got) and all(r <= 1.0 for r in ratios.values())
        rows.append({"shape": label, "N": n, "M": m, "d_qk": d_qk, "d_v": d_v, "dtype": dtype_name,
                     "kind": kind, "config": repr(config), "ok": bool(ok),
                     "worst_error_over_bound": max(ratios.values()), "errors": errors})

    for config in forward_candidates(fwd_table, n, m, d_qk, d_v, elem, shared_bytes=shared, prune=prune):
        out, lse, _ = forward(config)
        row("forward", config, (out, lse), want[:2], bounds[:2], names[:2])
    out, _, stats = forward(forward_candidates([fixed_fwd], n, m, d_qk, d_v, elem, shared_bytes=shared,
                                               prune=prune)[0])
    for config in backward_candidates(bwd_table, n, m, d_qk, d_v, elem, shared_bytes=shared, prune=prune):
        grads = launch_backward(lambda f: f, grad_out, grad_lse, q, k, v, out, stats, 1.0, "ieee", config,
                                d_pad, dv_pad)
        row("backward", config, grads, want[2:], bounds[2:], names[2:])
    return rows


def cmd_candidates(args):
    cuda = _cuda()
    if not cuda and not args.tiny:
        print("candidates: no CUDA device: run with --tiny (under TRITON_INTERPRET=1) to check on CPU")
        return NO_CUDA
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("candidates --tiny on CPU needs TRITON_INTERPRET=1 (set before triton is imported)")
        return 2
    device = "cuda" if cuda else "cpu"
    shapes = TINY_SHAPES if args.tiny else CANDIDATE_SHAPES
    rows, start = [], time.perf_counter()
    for label, n, m, d_qk, d_v, dtypes in shapes:
        for dt in dtypes:
            t0 = time.perf_counter()
            found = check_candidates(label, n, m, d_qk, d_v, dt, device, prune=cuda)
            rows += found
            bad = [r for r in found if not r["ok"]]
            print(f"{label:24s} N={n:5d} M={m:5d} d_qk={d_qk:3d} d_v={d_v:4d} {dt:8s} "
                  f"{len(found):2d} candidates, worst error/bound "
                  f"{max(r['worst_error_over_bound'] for r in found):.3f}, "
                  f"{'all pass' if not bad else f'{len(bad)} FAIL'} ({time.perf_counter() - t0:.1f} s)", flush=True)
            for r in bad:
                print(f"    FAIL {r['kind']} {r['config']}: {r['errors']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=1, default=str)
    failed = sum(not r["ok"] for r in rows)
    print(f"candidates: {len(rows)} checked, {failed} failed, {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------ profile
def cmd_profile(args):
    if not _cuda():
        print("profile: no CUDA device: nothing to profile (on a GPU: autotune the bench sites, print the "
              "winners, then a torch.profiler per-kernel breakdown)")
        return NO_CUDA
    import torch

    from fastattn import spatial_attention
    from fastattn.kernels.autotune import tuned_configs

    def step(site, batch, dtype, backward=True):
        n, m, d_qk, d_v = _site_dims(site)
        q, k, v = (torch.randn(batch, c, length, device="cuda", dtype=dtype, requires_grad=backward)
                   for c, length in ((d_qk, n), (d_qk, m), (d_v, m)))
        out = spatial_attention(q, k, v, backend="triton")
        if backward:
            out.backward(torch.randn_like(out))

    for site, batch in BENCH_SITES.items():
        for dt in BENCH_DTYPES:
            start = time.perf_counter()
            step(site, batch, _dtype(dt))
            torch.cuda.synchronize()
            print(f"autotuned {site} B={batch} {dt}: {time.perf_counter() - start:.2f} s (first call)", flush=True)
    print("\ntuned winners (key: kind, N, M, d_qk, d_v, dtype, precision, device):")
    for key, config in tuned_configs().items():
        print(f"  {key}: {config}")
    from torch.profiler import ProfilerActivity, profile

    dtype = _dtype(args.dtype)
    for _ in range(2):
        step(args.shape, args.batch, dtype)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(args.shape, args.batch, dtype)
        torch.cuda.synchronize()
    print(f"\nper-kernel time, 5 x forward+backward at {args.shape} B={args.batch} {args.dtype}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    return 0


# ----------------------------------------------------------------------------------- dispatch
def cmd_dispatch(args):
    import torch

    from fastattn.dispatch import available_backends, select_backend
    from fastattn.shapes import gan_shapes

    device = "cuda" if _cuda() else "cpu"
    dtype = _dtype(args.dtype)
    print(f"automatic dispatch on {device} ({torch.cuda.get_device_name(0) if device == 'cuda' else 'no CUDA device'}), "
          f"{args.dtype}, batch 1; backends: {', '.join(available_backends())}")
    for s in gan_shapes():
        q, k, v = (torch.empty(1, c, length, device=device, dtype=dtype)
                   for c, length in ((s.d_qk, s.N), (s.d_qk, s.M), (s.d_v, s.M)))
        try:
            chosen = select_backend(q, k, v).name
        except Exception as error:  # no backend: say why
            chosen = f"none ({str(error).splitlines()[0]})"
        print(f"  {s.id:22s} N={s.N:6d} M={s.M:6d} d_qk={s.d_qk:4d} d_v={s.d_v:4d} -> {chosen}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("warm", help="compile every candidate kernel the run needs, in parallel")
    w.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    w.add_argument("--scope", default="bench,candidates", help="comma list of: bench, candidates")
    w.add_argument("--dry-run", action="store_true", help="print the plan, compile nothing")
    w.add_argument("--verbose", action="store_true")
    w.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    w.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)
    c = sub.add_parser("candidates", help="every autotune candidate against fp64")
    c.add_argument("--tiny", action="store_true", help="one small shape (CPU, under TRITON_INTERPRET=1)")
    c.add_argument("--json", metavar="PATH")
    r = sub.add_parser("profile", help="tuned winners and a per-kernel time breakdown")
    r.add_argument("--shape", default="biggan128_G")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--dtype", default="bfloat16", choices=BENCH_DTYPES)
    d = sub.add_parser("dispatch", help="the backend automatic dispatch picks per GAN site")
    d.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if REPO not in sys.path:  # a checkout that was not installed: fastattn maps kernels/ itself
        sys.path.insert(0, REPO)
    return {"warm": cmd_warm, "candidates": cmd_candidates, "profile": cmd_profile,
            "dispatch": cmd_dispatch}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
