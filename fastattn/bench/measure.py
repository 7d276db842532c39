"""Timing, peak memory and accuracy of one provider on one case.

Timing: CUDA events around each repeat on a GPU (L2 flushed between repeats, as
triton.testing.do_bench does), time.perf_counter on a CPU; warm-up first, then repeats until a
minimum time has passed (within [min_repeats, max_repeats]); median and quartiles reported.
The `bwd` direction times the backward alone: the forward runs untimed before each repeat.
`fwd` is an inference forward (torch.no_grad); `fwd+bwd` is a training step's attention.

Peak memory, beyond the inputs (and, for `bwd`, beyond what the forward left saved):
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().
  CPU: in a fresh process forked from a clean fork server (a process that imported torch but ran
  nothing, so OpenMP is safe to use after the fork): build the inputs, run the case once (warm-up,
  which also checks it runs), free its results, give freed heap back to the OS (glibc mallopt:
  fixed 64 KiB mmap threshold; malloc_trim), reset the high-water mark (write 5 to
  /proc/self/clear_refs), read VmRSS, run the case once more and read VmHWM. Peak = VmHWM - VmRSS.
  The noise floor of this method (a 16x16 case, which allocates ~1 KiB) is measured per run and
  stored in the JSON environment block.
  CPU, in process (`peak_bytes_cpu_in_process`, for `fastattn verify`, whose user models cannot be
  sent to a fresh process): the same release / reset / VmRSS / VmHWM steps in the calling process,
  without changing its malloc settings, so freed blocks that glibc keeps can be reused unseen
  and the figure can read low; it is comparable between the two models measured side by side.
"""
from __future__ import annotations

import ctypes
import gc
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..constants import BENCH_MAX_TIME_FACTOR, BENCH_STABLE_SPREAD, TOLERANCES
from ..reference import reference_attention
from ..accuracy import max_abs_error
from .presets import DTYPES, PENALTY_DIRECTION, Case, Site

__all__ = ["Timing", "spread", "is_unstable", "CaseInputs", "make_inputs", "make_call", "time_call", "time_interleaved", "reference_results",
           "accuracy", "peak_bytes_cuda", "peak_bytes_cpu", "peak_bytes_cpu_fresh", "peak_bytes_cpu_in_process",
           "attention_case_call", "status_bytes", "reset_peak_rss", "cpu_noise_floor"]

# Bytes of fp64 logits per query chunk of the reference (chunking keeps its memory bounded;
# rows are independent, so chunking over queries changes no result).
_REF_CHUNK_BYTES = 256 * 2**20
_L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class Timing:
    median_s: float
    q25_s: float
    q75_s: float
    n_repeats: int
    times_s: list[float]

    @property
    def spread(self) -> float:
        """Interquartile range over the median: the noise of this measurement."""
        return spread(self.q25_s, self.median_s, self.q75_s)

    @property
    def unstable(self) -> bool:
        return is_unstable(self.spread)


def spread(q25_s: float, median_s: float, q75_s: float) -> float:
    return (q75_s - q25_s) / median_s if median_s > 0 else 0.0


def is_unstable(value: float) -> bool:
    """A case whose spread stayed above BENCH_STABLE_SPREAD when its repeats ran out."""
    return value > BENCH_STABLE_SPREAD


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) < 2:
        return (times[0],) * 3
    q25, q50, q75 = statistics.quantiles(times, n=4, method="inclusive")
    return q25, statistics.median(times), q75


@dataclass
class CaseInputs:
    q: Tensor
    k: Tensor
    v: Tensor
    grad_out: Tensor


def make_inputs(site: Site, dtype: str, device: torch.device, seed: int) -> CaseInputs:
    """Unit-variance inputs, generated in fp32 on the CPU from `seed` (so every provider and
    device sees the same values), then cast and moved."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(site.B, site.d_qk, site.N), (site.B, site.d_qk, site.M), (site.B, site.d_v, site.M),
              (site.B, site.d_v, site.N)]
    q, k, v, g = (torch.randn(s, generator=gen).to(device=device, dtype=DTYPES[dtype]) for s in shapes)
    return CaseInputs(q, k, v, g)


def make_call(fn: Callable, direction: str, x: CaseInputs, scale: float):
    """(setup, call): `call` is what is timed; `setup` runs untimed before it and returns its
    argument. call returns (out or None, grads or None) for the accuracy check."""
    params = (x.q, x.k, x.v)
    if direction == "fwd":
        def call(_):
            with torch.no_grad():
                return fn(x.q, x.k, x.v, scale), None
        return (lambda: None), call
    leaves = tuple(t.detach().requires_grad_() for t in params)
    if direction == PENALTY_DIRECTION:
        def call_penalty(_):
            out = fn(*leaves, scale)
            return out.detach(), penalty_grads(out, leaves, x.grad_out)
        return (lambda: None), call_penalty
    if direction == "fwd+bwd":
        def call(_):
            out = fn(*leaves, scale)
            return out.detach(), torch.autograd.grad(out, leaves, x.grad_out)
        return (lambda: None), call

    def setup():
        return fn(*leaves, scale)

    def call_bwd(out):
        return None, torch.autograd.grad(out, leaves, x.grad_out)
    return setup, call_bwd


def penalty_grads(out: Tensor, leaves: tuple, grad_out: Tensor) -> tuple:
    """R1-style double backward: gradients of sum |d<out, grad_out>/dx|^2 over x in (q, k, v).
    A provider whose backward has no derivative raises NotSupported with the library's reason."""
    from .providers import NotSupported

    try:
        first = torch.autograd.grad(out, leaves, grad_out, create_graph=True)
        penalty = sum(g.float().square().sum() for g in first)
        return torch.autograd.grad(penalty, leaves, allow_unused=True)
    except RuntimeError as error:
        if "not implemented" in str(error) or "does not require grad" in str(error):
            raise NotSupported(f"no double backward: {str(error).splitlines()[0]}") from error
        raise


def reference_penalty_grads(x: CaseInputs, scale: float) -> tuple:
    """fp64 gradients of the R1-style penalty (penalty_grads) by fastattn.reference, unchunked
    (the penalty's key-side gradients sum over every query)."""
    leaves = tuple(t.detach().to(torch.float64).requires_grad_() for t in (x.q, x.k, x.v))
    out = reference_attention(*leaves, scale)
    grads = penalty_grads(out, leaves, x.grad_out.to(torch.float64))
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _needs_more(times: list[float], spent: float, min_time_s: float, min_repeats: int) -> bool:
    """Whether one provider's repeats are not yet enough: under min_repeats or min_time_s, or
    still unstable (spread over BENCH_STABLE_SPREAD) within BENCH_MAX_TIME_FACTOR x min_time_s."""
    if len(times) < min_repeats or spent < min_time_s:
        return True
    if spent >= BENCH_MAX_TIME_FACTOR * min_time_s:
        return False
    q25, median, q75 = _quartiles(times)
    return is_unstable(spread(q25, median, q75))


def _timed_repeat(setup, call, device: torch.device, flush, clock) -> float:
    arg = setup()
    if device.type == "cuda":
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = call(arg)
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end) / 1e3
    else:
        t0 = clock()
        result = call(arg)
        elapsed = clock() - t0
    del result, arg
    return elapsed


def _round_order(names: list, round_index: int) -> list:
    """The order of timed round `round_index`: the given order on even rounds and its reverse on
    odd ones, rotated by round_index // 2. Over 2 x len(names) rounds every ordered pair (a right
    before b) occurs equally often inside the rounds."""
    base = names if round_index % 2 == 0 else names[::-1]
    start = (round_index // 2) % len(base)
    return base[start:] + base[:start]


def time_interleaved(calls: dict, device: torch.device, min_time_s: float, min_repeats: int, max_repeats: int,
                     warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time several (setup, call) pairs of one case in alternating rounds: warm-up rounds, then
    timed rounds in which every pair runs once, so that a change in the machine's load hits every
    provider alike. The warm-up rounds run in the order given; the timed rounds alternate between
    that order and its reverse, rotated by one every two rounds (_round_order), so that within the
    rounds each pair runs right after each other one equally often: a call inherits the caches and the
    allocator state (freed or trimmed memory, page faults on fresh pages) that the previous call
    left, which in a fixed order always favoured the same provider (measured: a 4 MiB sagan64
    forward ran 1.0x or 2.1x naive's time depending only on which provider ran before it).

    Every pair runs the same number of rounds: rounds go on while any pair still needs more (under
    min_repeats or min_time_s of its own time, or its spread over BENCH_STABLE_SPREAD while it has
    spent less than BENCH_MAX_TIME_FACTOR x min_time_s), up to max_repeats rounds. A pair that
    raises leaves the rotation; the others go on.

    Returns {name: (Timing, result of its first warm-up call)} or {name: the exception it raised}."""
    results: dict = {}
    firsts: dict = {}
    active = list(calls)

    def attempt(name, run):
        try:
            return run()
        except BaseException as error:  # KeyboardInterrupt / SystemExit go on up
            if not isinstance(error, Exception):
                raise
            results[name] = error
            active.remove(name)
            firsts.pop(name, None)
            return None

    for i in range(max(1, warmup)):
        for name in list(active):
            setup, call = calls[name]
            result = attempt(name, lambda: call(setup()))
            if i == 0 and name in active:
                firsts[name] = result
            del result
    _sync(device)
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None
    times: dict[str, list[float]] = {name: [] for name in active}
    spent = dict.fromkeys(active, 0.0)
    rounds = 0
    while active and rounds < max_repeats and any(
            _needs_more(times[n], spent[n], min_time_s, min_repeats) for n in active):
        for name in _round_order(active, rounds):
            elapsed = attempt(name, lambda: _timed_repeat(*calls[name], device, flush, clock))
            if name in active:
                times[name].append(elapsed)
                spent[name] += elapsed
        rounds += 1
    for name in active:
        q25, median, q75 = _quartiles(times[name])
        results[name] = (Timing(median, q25, q75, len(times[name]), times[name]), firsts[name])
    return {name: results[name] for name in calls}


def time_call(setup, call, device: torch.device, min_time_s: float, min_repeats: int, max_repeats: int,
              warmup: int = 1):
    """Timing of `call` and the result of the first warm-up call (used for the accuracy check):
    time_interleaved with one pair; an exception from `call` is raised."""
    outcome = time_interleaved({"call": (setup, call)}, device, min_time_s, min_repeats, max_repeats, warmup)["call"]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def reference_results(x: CaseInputs, scale: float, need_grads: bool):
    """fp64 out and (dq, dk, dv) of fastattn.reference on the same inputs, query chunk by chunk."""
    q, k, v, g = (t.detach().to(torch.float64) for t in (x.q, x.k, x.v, x.grad_out))
    batch, _, n_queries = q.shape
    rows = max(1, _REF_CHUNK_BYTES // max(1, 3 * batch * k.shape[2] * 8))
    out = torch.empty(batch, v.shape[1], n_queries, dtype=torch.float64, device=q.device)
    dq = torch.empty_like(q) if need_grads else None
    k_leaf, v_leaf = k.clone().requires_grad_(need_grads), v.clone().requires_grad_(need_grads)
    dk, dv = (torch.zeros_like(k), torch.zeros_like(v)) if need_grads else (None, None)
    for start in range(0, n_queries, rows):
        stop = min(n_queries, start + rows)
        with torch.set_grad_enabled(need_grads):
            q_chunk = q[:, :, start:stop].clone().requires_grad_(need_grads)
            out_chunk = reference_attention(q_chunk, k_leaf, v_leaf, scale)
        out[:, :, start:stop] = out_chunk.detach()
        if need_grads:
            gq, gk, gv = torch.autograd.grad(out_chunk, (q_chunk, k_leaf, v_leaf), g[:, :, start:stop])
            dq[:, :, start:stop] = gq
            dk += gk
            dv += gv
    return out, ((dq, dk, dv) if need_grads else None)


def _within(got: Tensor, want: Tensor, dtype: str) -> bool:
    tol = TOLERANCES[DTYPES[dtype]]
    got64 = got.detach().to(device=want.device, dtype=torch.float64)
    return bool(torch.isclose(got64, want, atol=tol["atol"], rtol=tol["rtol"], equal_nan=True).all())


def accuracy(result, reference, direction: str, dtype: str) -> dict:
    """Max abs errors against the fp64 reference (output; gradients dq, dk, dv together) and
    whether each is elementwise within fastattn.constants.TOLERANCES for the dtype."""
    out, grads = result
    ref_out, ref_grads = reference[:2]
    if direction == PENALTY_DIRECTION:  # the second-order gradients, against reference[2]
        ref_grads = reference[2]
        grads = tuple(torch.zeros_like(r) if g is None else g for g, r in zip(grads, ref_grads))
    fields = {}
    if direction in ("fwd", "fwd+bwd", PENALTY_DIRECTION):
        fields["out_err"] = max_abs_error(out, ref_out)
        fields["out_within_tol"] = _within(out, ref_out, dtype)
    if direction != "fwd":
        fields["grad_err"] = max(max_abs_error(g, r) for g, r in zip(grads, ref_grads))
        fields["grad_within_tol"] = all(_within(g, r, dtype) for g, r in zip(grads, ref_grads))
    fields["max_err"] = max(fields.get("out_err", 0.0), fields.get("grad_err", 0.0))
    return fields


def peak_bytes_cuda(setup, call, device: torch.device) -> int:
    arg = setup()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = call(arg)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result, arg
    return int(peak)


# --- CPU: one fresh forked process per measurement ------------------------------------------

def status_bytes(key: str) -> int:
    """A byte figure from /proc/self/status (VmRSS, VmHWM, ...); Linux only."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key} line")


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (Linux; raises OSError where refused)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _release_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _peak_of(setup, call) -> tuple[int, int]:
    """Release freed heap, reset the high-water mark, run call(setup()) once:
    (VmHWM - VmRSS, VmRSS before the call)."""
    _release_heap()
    arg = setup()
    _release_heap()
    reset_peak_rss()
    base = status_bytes("VmRSS")
    result = call(arg)
    peak = status_bytes("VmHWM") - base
    del result, arg
    return peak, base


def _cpu_child(conn, factory, factory_args: tuple, threads: int) -> None:
    """In the fresh process: (setup, call) = factory(*factory_args); one warm-up run, then the peak
    of one more run (see the module docstring)."""
    try:
        torch.set_num_threads(threads)
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD: big blocks mmapped, unmapped on free
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: return freed heap top to the OS
        except OSError:
            pass
        setup, call = factory(*factory_args)
        result = call(setup())  # warm-up (lazy initialisation, compilation, optimizer state)
        del result
        conn.send(("ok", _peak_of(setup, call)))  # (peak growth, resident before)
    except BaseException as error:  # reported to the parent, which records it
        conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


def peak_bytes_cpu_in_process(setup, call) -> int:
    """Peak resident memory growth of `call(setup())` in this process (Linux /proc only; raises
    OSError elsewhere). See the module docstring for how it differs from peak_bytes_cpu."""
    return max(0, int(_peak_of(setup, call)[0]))


_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "fastattn.bench.providers", "fastattn.bench.measure"])
    return _CONTEXT


def peak_bytes_cpu_fresh(factory, factory_args: tuple, threads: int | None = None,
                         timeout_s: float = 1800.0, with_resident: bool = False):
    """Peak resident memory growth of one run of `factory(*factory_args)`'s (setup, call) in a
    fresh process (the module docstring's CPU method); with_resident: (growth, resident set size
    just before the run). `factory` is a module-level function (it is sent to the process by
    name). Raises RuntimeError on failure."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_cpu_child, args=(child, factory, factory_args,
                                                   threads or torch.get_num_threads()))
    process.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise RuntimeError(f"memory measurement did not finish in {timeout_s:.0f} s")
        status, value = parent.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"memory measurement process died (exit code {process.exitcode}; "
                           "killed for memory?)") from None
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    if status != "ok":
        raise RuntimeError(value)
    peak, resident = int(value[0]), int(value[1])
    return (peak, resident) if with_resident else peak


def attention_case_call(site: Site, dtype: str, direction: str, provider: str, seed: int, scale: float):
    """(setup, call) of one provider on one case, built from scratch (peak_bytes_cpu's factory)."""
    from .providers import make_provider

    x = make_inputs(site, dtype, torch.device("cpu"), seed)
    return make_call(make_provider(provider), direction, x, scale)


def peak_bytes_cpu(site: Site, dtype: str, direction: str, provider: str, seed: int, scale: float,
                   threads: int | None = None, timeout_s: float = 1800.0) -> int:
    """Peak resident memory growth of one run in a fresh process; raises RuntimeError on failure."""
    return peak_bytes_cpu_fresh(attention_case_call, (site, dtype, direction, provider, seed, scale),
                                threads, timeout_s)


def cpu_noise_floor(repeats: int = 5, threads: int | None = None) -> int:
    """Largest peak this method reports for a case that allocates ~1 KiB."""
    tiny = Site.custom("noise_floor", 1, 16, 16, 8, 8)
    return max(peak_bytes_cpu(tiny, "float32", "fwd+bwd", "naive", 0, 1.0, threads) for _ in range(repeats))
