"""The kernels compile for real NVIDIA targets, and the fixed configurations do not spill.

The interpreter (tests/backends/triton/test_triton_interpreter.py) checks the maths but not what only the
compiler checks (constexpr globals, tl.dot shape rules, layouts, register pressure). Triton can
compile for a CUDA target without a GPU: this file runs the real launchers on meta tensors with
a recording `kernel_call`, compiles every recorded launch with triton.compile for sm_90 (and
sm_80), and reads registers and spill stack from the cubin with the cuobjdump that ships with
Triton. It runs in a subprocess because conftest.py switches the interpreter on in this one.

Run as a script to survey every autotuning candidate at a site (a development aid):
    python tests/backends/triton/test_triton_compile.py biggan128_G bf16 90
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.abspath(__file__)
_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _compile_launches(site, dtype_name, arch, which):
    """Compile the launches of the forward and backward at `site`; `which` is "fixed",
    "atomic" (the fixed config with one-pass dQ) or "all" (every candidate). Returns rows."""
    import dataclasses

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastattn.kernels import configs as cfg
    from fastattn.kernels.backward import launch_backward
    from fastattn.kernels.forward import launch_forward
    from fastattn.shapes import gan_shape

    s = gan_shape(site)
    dtype = getattr(torch, _DTYPES[dtype_name])
    elem = torch.empty((), dtype=dtype).element_size()
    fwd_table, bwd_table, fixed_fwd, fixed_bwd = cfg.tables(elem)
    if which == "all":
        fwd = cfg.forward_candidates(fwd_table, s.N, s.M, s.d_qk, s.d_v, elem, 227 * 1024)
        bwd = cfg.backward_candidates(bwd_table, s.N, s.M, s.d_qk, s.d_v, elem, 227 * 1024)
    else:
        fwd = cfg.forward_candidates([fixed_fwd], s.N, s.M, s.d_qk, s.d_v, elem)
        bwd = cfg.backward_candidates([fixed_bwd], s.N, s.M, s.d_qk, s.d_v, elem)
        if which == "atomic":
            fwd, bwd = [], [dataclasses.replace(bwd[0], atomic_dq=True)]

    meta = dict(device="meta", dtype=dtype)
    q, k, v = (torch.empty(2, s.d_qk, s.N, **meta), torch.empty(2, s.d_qk, s.M, **meta),
               torch.empty(2, s.d_v, s.M, **meta))
    out, lse = torch.empty(2, s.d_v, s.N, **meta), torch.empty(2, s.N, device="meta")
    stats = torch.empty(2, 2, s.N, device="meta")
    launches = []

    class record:  # noqa: N801 - stands in for torch.library.wrap_triton: record(kernel)[grid](...)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    d_pad, dv_pad = cfg.pad_width(s.d_qk), cfg.pad_width(s.d_v)
    for c in fwd:
        launch_forward(record, q, k, v, out, lse, stats, 1.0, "ieee", c, d_pad)
    for c in bwd:
        launch_backward(record, out, lse, q, k, v, out, stats, 1.0, "ieee", c, d_pad, dv_pad)

    pointer = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows, seen = [], set()
    for kernel, args, kwargs in launches:
        options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
        names = [p.name for p in kernel.params]
        values = dict(zip(names, args), **kwargs)
        signature, constexprs = {}, {}
        for p in kernel.params:
            value = values[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[p.name] = pointer[value.dtype]
            elif isinstance(value, float):
                signature[p.name] = "fp32"
            else:
                signature[p.name] = "i32"
        key = (kernel.__name__, json.dumps(signature, sort_keys=True), json.dumps(constexprs, sort_keys=True, default=str),
               json.dumps(options, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        row = {"kernel": kernel.__name__, "constexprs": constexprs, **options}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as error:
            rows.append({**row, "error": f"{type(error).__name__}: {str(error)[:600]}"})
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        found = dict(re.findall(r"(REG|STACK):(\d+)", usage))
        rows.append({**row, "regs": int(found.get("REG", -1)), "stack": int(found.get("STACK", -1)),
                     "shared": compiled.metadata.shared})
    return rows


def _run_subprocess(site, dtype_name, arch, which):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's notice; the default anyway
    result = subprocess.run([sys.executable, HERE, site, dtype_name, str(arch), which, "--json"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _tools_missing():
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    import inspect

    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        return "this triton's ASTSource takes no constexprs= (the offline compile is written for Triton >= 3.3)"
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(os.path.join(nvidia, "bin", tool)):
            return f"this triton install has no {tool}"
    return None


pytestmark = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))


@pytest.mark.parametrize(
    "site, dtype_name, arch, which",
    [
        ("biggan128_G", "bf16", 90, "fixed"),  # the headline site, d_v held whole
        ("biggan128_G", "bf16", 90, "atomic"),  # the one-pass dQ variant
        ("biggandeep256", "fp16", 90, "fixed"),  # d_qk 64, d_v 256: the split-d_v paths
        ("cifar_G", "fp16", 90, "fixed"),  # d_qk 48, d_v 192: split d_v with 4-warp dQ tiles
        ("cub128_D", "bf16", 80, "fixed"),  # Ampere
    ],
)
def test_kernels_compile_for_cuda_without_register_spills(site, dtype_name, arch, which):
    rows = _run_subprocess(site, dtype_name, arch, which)
    assert rows, "no launch was recorded"
    errors = [r for r in rows if "error" in r]
    assert not errors, json.dumps(errors, indent=1)
    spills = [r for r in rows if r["stack"] != 0]
    assert not spills, "register spills (stack bytes per thread):\n" + json.dumps(spills, indent=1)


def test_fp32_kernels_compile_for_cuda():
    # fp32 "ieee" dots run on FMA units and every backward tile spills a little (see
    # kernels/configs.py): this checks that they compile, not that they fit.
    rows = _run_subprocess("biggan128_G", "fp32", 90, "fixed")
    assert rows and not [r for r in rows if "error" in r], json.dumps(rows, indent=1)
    assert all(r["stack"] == 0 for r in rows if r["kernel"] == "attention_forward_kernel"), json.dumps(rows, indent=1)


if __name__ == "__main__":
    site_arg, dtype_arg, arch_arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    which_arg = sys.argv[4] if len(sys.argv) > 4 and not sys.argv[4].startswith("--") else "all"
    result_rows = _compile_launches(site_arg, dtype_arg, arch_arg, which_arg)
    if "--json" in sys.argv:
        print(json.dumps(result_rows))
    else:
        for r in result_rows:
            shown = {k: v for k, v in r["constexprs"].items() if k.startswith(("BLOCK", "WITH", "ATOMIC", "DV_"))}
            print(r["kernel"], shown, f"warps={r['num_warps']} stages={r['num_stages']}",
                  r.get("error") or f"regs={r['regs']} stack={r['stack']} shared={r['shared']}")
