"""The README's example runs as written, and its two commands are the ones CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs_and_swaps_the_generator(capsys):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["y"].shape == namespace["x"].shape
    assert namespace["out"].shape == (8, 96, 4096)
    assert "swapped=[('attn', 'fastattn')]" in capsys.readouterr().out


def test_ci_runs_exactly_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in README
    assert "pytest" in ci_command and 'torch==2.13.0' in ci_command
