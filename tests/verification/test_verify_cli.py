"""`fastattn verify`: exit 0 on parity, 1 with the failing checks first, 2 with a message on bad usage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastattn import unregister_adapter
from fastattn.cli import main
from verify_models import WRONG_ADAPTER

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _importable_models(monkeypatch):
    monkeypatch.chdir(HERE)  # `--model verify_models:...` is found from the working directory
    yield
    unregister_adapter(WRONG_ADAPTER.name, missing_ok=True)


def test_cli_passes_on_the_reference_generator_and_writes_json_and_markdown(tmp_path, capsys):
    code = main(["verify", "--model", "verify_models:generator", "--input", "2,16", "--dtype", "float32",
                 "--no-timing", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("fastattn.verify Generator on cpu") and ": PASS" in out.splitlines()[0]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ok"] and data["layers"][0]["name"] == "attn"
    assert "| attn | float32 | eval |" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("factory, failing", [
    ("make_wrong_adapter_model", "FAIL model swapped: 1 (ScaledAttention) not swapped: as scaled_qkv_gain_no_scale"),
    ("make_tampered_model", "FAIL 1 float32 eval output: swapped error"),
])
def test_cli_exits_1_and_prints_the_failing_checks_first(factory, failing, capsys):
    code = main(["verify", "--model", f"verify_models:{factory}", "--input", "2,3,4,5", "--dtype", "float32",
                 "--no-timing"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[0].startswith(failing), out
    assert ": FAIL (" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_module_xyz:make", "--input", "2,16"], "no module named 'no_such_module_xyz'"),
    (["--model", "verify_models:nope", "--input", "2,16"], "module 'verify_models' has no 'nope'"),
    (["--model", "verify_models", "--input", "2,16"], "--model must be MODULE:FACTORY"),
    (["--model", "verify_models:make_raises", "--input", "2,16"],
     "calling the factory raised ValueError: checkpoint G.pt not found"),
    (["--model", "verify_models:make_not_a_model", "--input", "2,16"], "the factory returned a dict"),
    (["--model", "verify_models:generator", "--input", "2,x"], "argument --input: expected a shape"),
    (["--model", "verify_models:generator", "--input", "2,0"], "argument --input: expected a shape"),
    (["--model", "verify_models:generator", "--input", "2,17"], "raised on the example inputs in float64"),
    (["--model", "verify_models:generator"], "the following arguments are required: --input"),
])
def test_cli_bad_usage_exits_2_naming_what_was_wrong(argv, message, capsys):
    assert main(["verify", *argv, "--dtype", "float32", "--no-timing"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_installed_command_reports_bad_usage_without_a_traceback():
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_BACKEND"}
    done = subprocess.run([sys.executable, "-m", "fastattn", "verify", "--model", "verify_models:make_raises",
                           "--input", "2,16"], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("fastattn verify: --model verify_models:make_raises: calling the factory "
                                   "raised ValueError: checkpoint G.pt not found")
