"""Compile the kernels' real launches for an NVIDIA target without a GPU, and read their resources.

The launchers (launch_forward, launch_backward) run on meta tensors with a recording
`kernel_call`; each recorded launch is then specialised exactly as Triton's JIT specialises a
real launch (its own binder: ints divisible by 16 get `tt.divisibility`, ints equal to 1 become
constants, pointers are 16-byte aligned as every torch allocation is) and compiled with
triton.compile for the target. Registers and spill stack come from the cubin (the cuobjdump
that ships with Triton), shared memory from the compiled metadata.

An aligned shape (N, M and the channel counts multiples of 16, contiguous tensors) thus
compiles with vectorised loads and cp.async pipelining, as on the GPU; a ragged one (N = 4093)
does not. The older plain-i32 compile (every int unspecialised, no alignment) is kept as
`specialise=False` for comparison: it overestimated registers for aligned shapes.

Used by tests/backends/triton/test_triton_compile.py and benchmarks/gpu_check.py (warm plan).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton

from .backward import launch_backward
from .configs import pad_width
from .forward import launch_forward

__all__ = ["Launch", "record_launches", "launch_key", "compile_launch", "tools_missing"]

_POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


def record_launches(n, m, d_qk, d_v, dtype, forward_configs=(), backward_configs=(), batch=2, device="meta",
                    precision="ieee"):
    """The kernel launches of one forward per forward config and one backward per backward
    config at this shape, recorded (not run) on `device` tensors (meta: no memory, aligned)."""
    meta = dict(device=device, dtype=dtype)
    q, k, v = (torch.empty(batch, d_qk, n, **meta), torch.empty(batch, d_qk, m, **meta),
               torch.empty(batch, d_v, m, **meta))
    out = torch.empty(batch, d_v, n, **meta)
    lse = torch.empty(batch, n, device=device, dtype=torch.float32)
    stats = torch.empty(batch, 2, n, device=device, dtype=torch.float32)
    launches = []

    class record:  # noqa: N801 - stands in for torch.library.wrap_triton: record(kernel)[grid](...)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, tuple(grid), args, dict(kwargs)))

    d_pad, dv_pad = pad_width(d_qk), pad_width(d_v)
    for c in forward_configs:
        launch_forward(record, q, k, v, out, lse, stats, 1.0, precision, c, d_pad)
    for c in backward_configs:
        launch_backward(record, out, lse, q, k, v, out, stats, 1.0, precision, c, d_pad, dv_pad)
    return launches


def _target(arch):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", int(arch), 32)


def _as_dict(options):
    if isinstance(options, dict):
        return dict(options)
    import dataclasses

    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def _specialised(launch, arch):
    """(signature, constexprs, attrs, options) as the JIT computes them for this launch."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(_target(arch))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.kwargs), bound_args,
                                                              specialization, options)
    return signature, constexprs, attrs, options


def _plain(launch):
    """The old offline compile: every int a plain i32, no alignment, no constant 1."""
    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    values = dict(zip([p.name for p in kernel.params], launch.args), **kwargs)
    signature, constexprs = {}, {}
    for p in kernel.params:
        value = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = _POINTER[value.dtype]
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
    return signature, constexprs, {}, options


def launch_key(launch, arch=90, specialise=True):
    """A string that is equal for two launches exactly when the JIT would reuse one binary."""
    signature, constexprs, attrs, options = _specialised(launch, arch) if specialise else _plain(launch)
    options = _as_dict(options)
    wanted = {k: options.get(k) for k in ("num_warps", "num_stages", "num_ctas")}
    return json.dumps([launch.kernel.__name__, signature, {str(k): v for k, v in constexprs.items()},
                       {str(k): v for k, v in attrs.items()}, wanted], sort_keys=True, default=str)


def _short_constexprs(constexprs):
    shown = {}
    for key, value in constexprs.items():
        name = key if isinstance(key, str) else None
        if name and name.startswith(("BLOCK", "WITH", "ATOMIC", "DV_", "D_PAD")):
            shown[name] = value
    return shown


def compile_launch(launch, arch=90, specialise=True):
    """Compile one recorded launch for sm_<arch>; a row with regs, stack (spill bytes per
    thread), shared (bytes), or error."""
    from triton.compiler import ASTSource

    kernel = launch.kernel
    signature, constexprs, attrs, options = _specialised(launch, arch) if specialise else _plain(launch)
    options = _as_dict(options)
    named = {p.name: launch.kwargs.get(p.name) for p in kernel.params if p.is_constexpr}
    row = {"kernel": kernel.__name__, "constexprs": _short_constexprs(named),
           "num_warps": options.get("num_warps"), "num_stages": options.get("num_stages"),
           "specialised": specialise, "arch": int(arch)}
    if specialise:  # options here are the backend's full option set; compile re-parses them
        options = {k: v for k, v in options.items() if k in ("num_warps", "num_stages", "num_ctas", "debug")}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=_target(arch), options=options)
    except Exception as error:  # out of resources, a layout the backend rejects
        return {**row, "error": f"{type(error).__name__}: {str(error)[:600]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    return {**row, "regs": int(found.get("REG", -1)), "stack": int(found.get("STACK", -1)),
            "shared": int(compiled.metadata.shared)}


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def tools_missing():
    """Why this Triton cannot compile offline here, or None."""
    import inspect

    from triton.compiler import ASTSource

    try:
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError:
        return "this triton has no runtime.jit.create_function_from_signature (the JIT's binder)"
    parameters = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in parameters or "attrs" not in parameters:
        return "this triton's ASTSource takes no constexprs=/attrs= (written for Triton >= 3.3)"
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(_tool(tool)):
            return f"this triton install has no {tool}"
    return None
