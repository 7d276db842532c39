"""The kernels compile for real NVIDIA targets, and the candidates that pruning keeps fit.

The interpreter (tests/backends/triton/test_triton_interpreter.py) checks the maths but not what only the
compiler checks (constexpr globals, tl.dot shape rules, layouts, register pressure). Triton can
compile for a CUDA target without a GPU: kernels/offline_compile.py runs the real launchers on
meta tensors, specialises each launch as Triton's JIT does on a GPU (divisibility by 16, unit
strides as constants), compiles it for sm_90 or sm_80 and reads registers, spill stack and
shared memory. Aligned shapes (every GAN site) and ragged ones (N, M three less) compile very
differently, so both are checked against the budgets of kernels/configs.py. It runs in a
subprocess because conftest.py switches the interpreter on in this one.

CI compiles a representative subset; FASTATTN_COMPILE_ALL=1 compiles every candidate at more
sites. Run as a script to survey every candidate at a site (a development aid):
    python tests/backends/triton/test_triton_compile.py biggan128_G bf16 90 [all|fixed|atomic] [--ragged]
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# The opt-in shared memory per block of the parts these targets stand for (A100, H100/H200).
_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
# Every candidate at every listed site (slow: minutes) instead of the CI subset.
ALL_ENV_VAR = "FASTATTN_COMPILE_ALL"


def _compile_launches(site, dtype_name, arch, which, ragged=False):
    """Compile the launches of the forward and backward at `site` (ragged: N and M three less,
    so no stride is a multiple of 16) as a real launch specialises them; `which` is "fixed",
    "atomic" (the fixed config with one-pass dQ) or "all" (every candidate that survives
    pruning). Returns rows."""
    import dataclasses

    import torch

    from fastattn.kernels import configs as cfg
    from fastattn.kernels.offline_compile import compile_launch, launch_key, record_launches
    from fastattn.shapes import gan_shape

    s = gan_shape(site)
    n, m = (s.N - 3, s.M - 3) if ragged else (s.N, s.M)
    dtype = getattr(torch, _DTYPES[dtype_name])
    elem = torch.empty((), dtype=dtype).element_size()
    fwd_table, bwd_table, fixed_fwd, fixed_bwd = cfg.tables(elem)
    shared = _SHARED_BYTES[int(arch)]
    if which == "all":
        fwd = cfg.forward_candidates(fwd_table, n, m, s.d_qk, s.d_v, elem, shared)
        bwd = cfg.backward_candidates(bwd_table, n, m, s.d_qk, s.d_v, elem, shared)
    else:
        fwd = cfg.forward_candidates([fixed_fwd], n, m, s.d_qk, s.d_v, elem, shared)
        bwd = cfg.backward_candidates([fixed_bwd], n, m, s.d_qk, s.d_v, elem, shared)
        if which == "atomic":
            fwd, bwd = [], [dataclasses.replace(bwd[0], atomic_dq=True)]
    rows, seen = [], set()
    for launch in record_launches(n, m, s.d_qk, s.d_v, dtype, fwd, bwd):
        key = launch_key(launch, arch)
        if key in seen:
            continue
        seen.add(key)
        rows.append({**compile_launch(launch, arch), "site": site, "ragged": ragged})
    return rows


def _run_subprocess(site, dtype_name, arch, which, ragged=False):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's notice; the default anyway
    argv = [sys.executable, HERE, site, dtype_name, str(arch), which, "--json"] + (["--ragged"] if ragged else [])
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _tools_missing():
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    from fastattn.kernels.offline_compile import tools_missing

    return tools_missing()


pytestmark = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))
_ALL = os.environ.get(ALL_ENV_VAR) == "1"
_ALL_SITES = [(site, dtype, arch, "all", ragged) for site in ("biggan128_G", "biggandeep256", "sagan64_unpooled_G",
                                                              "cifar_G", "biggan128_D")
              for dtype in ("bf16", "fp16") for arch in (90, 80) for ragged in (False, True)]


def _assert_fit(rows):
    assert rows, "no launch was recorded"
    errors = [r for r in rows if "error" in r]
    assert not errors, json.dumps(errors, indent=1)
    spills = [r for r in rows if r["stack"] != 0]
    assert not spills, "register spills (stack bytes per thread):\n" + json.dumps(spills, indent=1)
    over = [r for r in rows if r["shared"] > _SHARED_BYTES[r["arch"]]]
    assert not over, "shared memory over the part's limit:\n" + json.dumps(over, indent=1)


@pytest.mark.parametrize(
    "site, dtype_name, arch, which, ragged",
    [
        ("biggan128_G", "bf16", 90, "all", False),  # the headline site, every candidate, aligned
        ("biggan128_G", "bf16", 90, "all", True),  # ... and ragged (the tighter budgets)
        ("biggan128_G", "bf16", 90, "atomic", False),  # the one-pass dQ variant
        ("biggandeep256", "fp16", 90, "fixed", True),  # d_qk 64, d_v 256: the split-d_v paths, ragged
        ("cifar_G", "fp16", 90, "fixed", False),  # d_qk 48, d_v 192: split d_v with 4-warp dQ tiles
        ("cub128_D", "bf16", 80, "fixed", True),  # Ampere
    ] + (_ALL_SITES if _ALL else []),
)
def test_pruned_candidates_compile_without_spills_within_shared_memory(site, dtype_name, arch, which, ragged):
    _assert_fit(_run_subprocess(site, dtype_name, arch, which, ragged))


def test_fp32_kernels_compile_for_cuda():
    # fp32 "ieee" dots run on FMA units and every backward tile spills a little (see
    # kernels/configs.py): this checks that they compile, not that they fit.
    rows = _run_subprocess("biggan128_G", "fp32", 90, "fixed")
    assert rows and not [r for r in rows if "error" in r], json.dumps(rows, indent=1)
    assert all(r["stack"] == 0 for r in rows if r["kernel"] == "attention_forward_kernel"), json.dumps(rows, indent=1)


if __name__ == "__main__":
    site_arg, dtype_arg, arch_arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    which_arg = sys.argv[4] if len(sys.argv) > 4 and not sys.argv[4].startswith("--") else "all"
    result_rows = _compile_launches(site_arg, dtype_arg, arch_arg, which_arg, ragged="--ragged" in sys.argv)
    if "--json" in sys.argv:
        print(json.dumps(result_rows))
    else:
        for r in result_rows:
            print(r["kernel"], r["constexprs"], f"warps={r['num_warps']} stages={r['num_stages']}",
                  r.get("error") or f"regs={r['regs']} stack={r['stack']} shared={r['shared']}")
