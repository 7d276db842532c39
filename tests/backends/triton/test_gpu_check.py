"""benchmarks/gpu_check.sh and gpu_check.py work before a GPU is lent: the script parses, its dry
run prints the plan, and the every-candidate checker passes at a tiny size in the interpreter."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
CHECKER = os.path.join(REPO, "benchmarks", "gpu_check.py")
pytest.importorskip("triton")


def _run(cmd, **env):
    merged = dict(os.environ, PYTHON=sys.executable, TRITON_DEFAULT_FP_FUSION="1", **env)
    return subprocess.run(cmd, cwd=REPO, env=merged, capture_output=True, text=True, timeout=120)


def test_gpu_check_script_parses_and_dry_run_prints_every_step_and_the_warm_plan():
    assert _run(["bash", "-n", SCRIPT]).returncode == 0
    result = _run(["bash", SCRIPT, "--dry-run"])
    assert result.returncode == 0, result.stderr[-2000:]
    for step in ("env", "install", "dispatch", "warm", "tests", "candidates", "profile", "bench_b8", "bench_b1"):
        assert f"  {step} " in result.stdout, result.stdout
    assert "distinct kernel launches" in result.stdout


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the tiny check runs in the interpreter")
def test_every_candidate_passes_the_accuracy_rule_at_a_tiny_ragged_shape_in_the_interpreter():
    result = _run([sys.executable, CHECKER, "candidates", "--tiny"], TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "0 failed" in result.stdout


def test_gpu_only_steps_say_no_cuda_device_without_one():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = _run([sys.executable, CHECKER, "profile"])
    assert result.returncode == 77 and "no CUDA device" in result.stdout
