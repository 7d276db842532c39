"""Which configuration a launch uses: fixed, interpreted, or autotuned per shape.

Autotuning times every candidate of kernels/configs.py that survives pruning, on the call's own
tensors, once per key (N, M, d_qk, d_v, dtype, fp32 precision, device), and caches the winner
for the process. Done here rather than with triton.autotune because one attention pass is
several launches (the backward's delta, dK/dV and dQ kernels) that must be timed together.

FASTATTN_TRITON_CONFIG=fixed (or torch.use_deterministic_algorithms(True)) selects the fixed
configurations: no timing, a two-pass backward, bit-identical results from run to run.
Under TRITON_INTERPRET=1 the interpreter's small configuration is always used: interpreted
autotuning would take minutes. While torch.compile traces the op (fake tensors, nothing to
time) the cached winner is used if there is one, else the first candidate.
"""
from __future__ import annotations

import os

import torch
import triton
from triton.runtime.jit import JITFunction

from .configs import (INTERPRETER_BACKWARD, INTERPRETER_FORWARD, backward_candidates, forward_candidates,
                      launch_aligned, tables)
from .forward import attention_forward_kernel

__all__ = ["CONFIG_ENV_VAR", "interpreting", "forward_config", "backward_config", "tuned_configs"]

CONFIG_ENV_VAR = "FASTATTN_TRITON_CONFIG"
_MODES = ("auto", "fixed")
# Timing budget per candidate (ms), for triton.testing.do_bench: enough to separate configs
# whose times differ by more than ~5% on a quiet GPU, small enough that a first call at a new
# shape costs well under a second.
_WARMUP_MS, _REP_MS = 5, 20

_TUNED: dict[tuple, object] = {}


def interpreting() -> bool:
    """True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 was set
    when triton was first imported): they then run on CPU tensors, slowly."""
    return not isinstance(attention_forward_kernel, JITFunction)


def tuned_configs() -> dict[tuple, object]:
    """The autotuner's choices so far, by key (kind, N, M, d_qk, d_v, dtype, precision, device,
    aligned)."""
    return dict(_TUNED)


def _mode() -> str:
    mode = os.environ.get(CONFIG_ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{CONFIG_ENV_VAR} must be one of {list(_MODES)} (or unset), got {mode!r}")
    return mode


def _fixed() -> bool:
    return _mode() == "fixed" or torch.are_deterministic_algorithms_enabled()


def _tracing(t: torch.Tensor) -> bool:
    """Fake/meta tensors (torch.compile tracing the op): there is nothing to time."""
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - every torch this project supports has it
        return False
    return is_fake(t)


def _shared_bytes(device: torch.device):
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None)


def _pick(key, candidates, run, sample):
    if _tracing(sample):
        return candidates[0]
    if len(candidates) == 1:
        _TUNED[key] = candidates[0]
        return candidates[0]
    times, first_error = {}, None
    for config in candidates:
        try:
            times[config] = triton.testing.do_bench(lambda: run(config), warmup=_WARMUP_MS, rep=_REP_MS)
        except Exception as error:  # a config the compiler rejects (e.g. out of resources)
            first_error = first_error or error
    if not times:
        raise RuntimeError(f"no Triton attention configuration could run for {key}") from first_error
    _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def _sizes(q, v):
    """(N, M, d_qk, d_v) as ints: under torch.compile with dynamic shapes these are SymInts, and
    the tile choice needs concrete values (int() specializes the compiled graph on them)."""
    return int(q.shape[2]), int(v.shape[2]), int(q.shape[1]), int(v.shape[1])


def _aligned(q, k, v) -> bool:
    """Whether the launch is specialised as aligned (configs.launch_aligned): its register and
    shared-memory budgets, hence its candidates, differ from a ragged launch's."""
    return launch_aligned(*(x for t in (q, k, v) for x in (*t.stride(), t.storage_offset())))


def _key(kind, q, v, precision, aligned):
    return (kind, *_sizes(q, v), q.dtype, precision, str(q.device), aligned)


def _config(kind, q, k, v, precision, run, candidates_fn, interpreter_config, **fixed_kwargs):
    """The configuration of one pass: interpreted, fixed, or autotuned per shape. An autotuned
    shape seen before costs one dict lookup: the cache is read before the device properties
    and the candidate list (every call of the op passes here)."""
    args = (*_sizes(q, v), q.element_size())
    fixed = _fixed()  # validates FASTATTN_TRITON_CONFIG everywhere, interpreter included
    if interpreting():
        return candidates_fn([interpreter_config], *args, prune=False)[0]
    aligned = _aligned(q, k, v)
    key = None if fixed else _key(kind, q, v, precision, aligned)
    if key in _TUNED:
        return _TUNED[key]
    shared = _shared_bytes(q.device)
    forward_table, backward_table, fixed_forward, fixed_backward = tables(q.element_size())
    table, fixed_config = (forward_table, fixed_forward) if kind == "forward" else (backward_table, fixed_backward)
    if fixed:
        return candidates_fn([fixed_config], *args, shared_bytes=shared, aligned=aligned, **fixed_kwargs)[0]
    return _pick(key, candidates_fn(table, *args, shared_bytes=shared, aligned=aligned), run, q)


def forward_config(q, k, v, precision, run):
    """The ForwardConfig for these inputs; `run(config)` launches the forward once (for timing)."""
    return _config("forward", q, k, v, precision, run, forward_candidates, INTERPRETER_FORWARD)


def backward_config(q, k, v, precision, run):
    """The BackwardConfig for these inputs; `run(config)` launches the whole backward once.
    The fixed configuration is a two-pass (deterministic) one."""
    return _config("backward", q, k, v, precision, run, backward_candidates, INTERPRETER_BACKWARD,
                   deterministic=True)
