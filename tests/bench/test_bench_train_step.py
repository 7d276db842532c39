"""`fastattn bench --preset train-step`: a whole G+D training step, naive layers vs fastattn."""
import json

import torch

from fastattn.bench import main
from fastattn.bench.train_step import StepSetting, build_trainer


def test_both_variants_start_from_the_same_weights_and_take_the_same_first_step():
    setting = StepSetting(16, ch=4)
    naive, ours = build_trainer(setting, "naive"), build_trainer(setting, "fastattn")
    assert naive.generator.attn_resolution == naive.discriminator.attn_resolution == 8
    a, b = naive.train_step(), ours.train_step()
    for key in ("loss_g", "loss_d"):
        assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_tiny_train_step_preset_times_both_variants_interleaved_and_measures_memory(tmp_path, capsys):
    out, md = tmp_path / "step.json", tmp_path / "step.md"
    argv = ["--preset", "train-step", "--resolution", "16", "--ch", "4", "--repeats", "3", "--min-time", "0",
            "--threads", "1", "--json", str(out), "--markdown", str(md)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["env"]["preset"] == "train-step" and "interleaved" in data["env"]["timing"]
    assert "load_average_at_start" in data["env"] and data["env"]["torch_threads"] == 1
    by = {r["provider"]: r for r in data["records"]}
    assert set(by) == {"naive", "fastattn"}
    for r in by.values():
        assert r["status"] == "ok" and r["N"] == 64 and r["M"] == 16 and r["batch"] == 2
        assert r["n_repeats"] == 3 and 0 < r["q25_s"] <= r["median_s"] <= r["q75_s"]
        assert r["peak_bytes"] > 0 and r["resident_before_bytes"] > r["peak_bytes"]
    assert by["fastattn"]["time_vs_naive"] == by["fastattn"]["median_s"] / by["naive"]["median_s"]
    assert by["fastattn"]["mem_vs_naive"] == by["fastattn"]["peak_bytes"] / by["naive"]["peak_bytes"]
    table = md.read_text()
    assert table.startswith("Machine: CPU") and "| 16 | 8x8 (64 x 16) | 2 | 4 |" in table
    assert "time: fastattn / naive" in table
    capsys.readouterr()
    assert main(["--from-json", str(out), "--markdown", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == table
