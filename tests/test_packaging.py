"""The source tree imports like the install: `fastattn.kernels` from the repository root with a
non-editable install (where the source `fastattn/` shadows the installed package), from anywhere
else, and a clear `fastattn info` where the kernels cannot load."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs the Triton backend on a tiny CPU input under the interpreter and says where things came from.
PROBE = """
import torch, fastattn, fastattn.kernels.forward as forward
q = torch.randn(1, 4, 5); k = torch.randn(1, 4, 3); v = torch.randn(1, 6, 3)
out = fastattn.spatial_attention(q, k, v, backend="triton")
want = fastattn.reference_attention(q.double(), k.double(), v.double())
assert (out.double() - want).abs().max() < 1e-5, "triton backend result is wrong"
print(fastattn.__file__); print(forward.__file__)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable install of this checkout into a folder of its own (no dependencies: torch
    and triton come from the test environment)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, cwd=target)
    return target


def _run(code: str, cwd: Path, site: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that sees `site` first, then this environment's packages,
    but none of its .pth files (-S): an editable install of this checkout would otherwise map
    fastattn.kernels itself and hide what a plain non-editable install does."""
    path = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {**os.environ, "PYTHONPATH": path, "TRITON_INTERPRET": "1"}
    env.pop("FASTATTN_BACKEND", None)
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_triton_backend_runs_from_the_repository_root_over_a_non_editable_install(installed):
    done = _run(PROBE, ROOT, installed)
    assert done.returncode == 0, done.stderr
    package, kernels = done.stdout.split()
    assert Path(package).parent == ROOT / "fastattn"  # the source tree shadows the install ...
    assert Path(kernels).parent == ROOT / "kernels"   # ... and still finds the kernels


def test_triton_backend_runs_from_elsewhere_on_the_installed_copy(installed, tmp_path):
    done = _run(PROBE, tmp_path, installed)
    assert done.returncode == 0, done.stderr
    package, kernels = done.stdout.split()
    assert Path(package).parent == installed / "fastattn"
    assert Path(kernels).parent == installed / "fastattn" / "kernels"


def test_info_reports_triton_unavailable_with_the_reason_when_the_kernels_cannot_load(tmp_path):
    broken = tmp_path / "broken" / "triton"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this triton is broken')\n")
    done = _run("import fastattn.cli as c; c.main(['info'])", ROOT, tmp_path / "broken")
    assert done.returncode == 0, done.stderr
    rows = {row.split()[0]: row for row in done.stdout.splitlines()[1:] if row.split()[1:2] and row.split()[1].isdigit()}
    assert "unavailable:" in rows["triton"] and "this triton is broken" in rows["triton"], done.stdout
    assert rows["torch"].endswith("available") and "unavailable" not in rows["torch"], done.stdout
    done = _run("import torch, fastattn\nfastattn.spatial_attention(torch.randn(1, 4, 5), torch.randn(1, 4, 3), "
                "torch.randn(1, 6, 3), backend='triton')", ROOT, tmp_path / "broken")
    assert done.returncode != 0 and "BackendUnavailableError" in done.stderr
    assert "this triton is broken" in done.stderr
