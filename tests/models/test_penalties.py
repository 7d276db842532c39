"""R1 gradient penalty in the reference GAN (fastattn.models.penalties; `fastattn train --r1`, lazy
with --r1-every), trained on the scikit-learn digits."""
import json
from pathlib import Path

import pytest
import torch

from fastattn.models.train import main

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")

# 16x16 digits, attention at 16 in G (N = M = 256) and at 8 in D, where R1 differentiates twice
TINY = ["--data", "digits", "--resolution", "16", "--ch", "4", "--z-dim", "8", "--batch-size", "4",
        "--g-attn-res", "16", "--d-attn-res", "8", "--fd-samples", "0", "--quiet"]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _trainer_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)["trainer"]


def test_lazy_r1_run_logs_the_penalty_on_regularised_steps_and_resumes_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    r1 = ["--r1", "2", "--r1-every", "2", "--sample-every", "0", "--ckpt-every", "1"]
    assert main(["--out", str(whole), "--steps", "4", *r1, *TINY]) == 0
    assert main(["--out", str(split), "--steps", "3", *r1, *TINY]) == 0  # stops between R1 steps
    assert main(["--out", str(split), "--steps", "4", "--resume", *TINY]) == 0
    rows = _log(whole)
    assert [r["r1"] is not None for r in rows] == [True, False, True, False]  # D updates 0 and 2
    assert all(r["r1"] > 0 for r in rows if r["r1"] is not None)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "fd8")} for r in rs]  # noqa: E731
    assert strip(_log(split)) == strip(rows)
    a, b = _trainer_state(whole), _trainer_state(split)
    for part in ("generator", "discriminator"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    config = json.loads((split / "config.json").read_text())
    assert config["r1"] == 2.0 and config["r1_every"] == 2 and config["n_classes"] == 10


def test_r1_step_through_fastattn_matches_naive_attention_fp64(tmp_path):
    """The penalty's double backward through the attention layers gives the naive layers' update."""
    runs = {}
    for attention in ("naive", "fastattn"):
        out = tmp_path / attention
        assert main(["--out", str(out), "--steps", "2", "--r1", "10", "--dtype", "float64", "--sample-every", "0",
                     "--attention", attention, *TINY]) == 0
        runs[attention] = (_log(out), _trainer_state(out))
    (log_n, state_n), (log_f, state_f) = runs["naive"], runs["fastattn"]
    for row_n, row_f in zip(log_n, log_f):
        assert row_f["r1"] == pytest.approx(row_n["r1"], rel=1e-9)
    for key, value in state_n["discriminator"].items():
        torch.testing.assert_close(state_f["discriminator"][key], value, rtol=1e-9, atol=1e-12, msg=key)
