"""`fastattn train`: outputs, resume, --data folders, and clear errors for bad arguments."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastattn import cli
from fastattn.models.train import main

# A model small enough that a step takes milliseconds: 16x16, attention at 16 in G, 8 in D.
TINY = ["--resolution", "16", "--ch", "4", "--z-dim", "8", "--batch-size", "4", "--n-images", "32",
        "--g-attn-res", "16", "--d-attn-res", "8", "--fd-samples", "16", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_train_writes_one_log_row_per_step_with_losses_and_all_outputs(tmp_path):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "3", "--sample-every", "2", *TINY]) == 0
    rows = _log(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert all(isinstance(row[k], float) and row[k] == row[k] for k in ("loss_g", "loss_d"))
        assert row["gamma_g"] is not None and row["gamma_d"] is not None
    assert "fd8" in rows[1] and "fd8" in rows[2] and "fd8" not in rows[0]
    for name in ("step_000000.png", "step_000002.png", "step_000003.png"):
        # 4 classes x 8 samples of 16 px with 2 px padding
        assert _png_size(out / "samples" / name) == (8 * 18 + 2, 4 * 18 + 2)
    assert _png_size(out / "losses.png")[0] > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["fd8_initial"] > 0 and summary["fd8_final"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["n_classes"] == 4 and config["attention"] == "fastattn"
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["trainer"]["step"] == 3


def test_cli_routes_train_to_the_trainer(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--steps", "1", "--attention", "naive", *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["attention"] == "naive"
    assert "trained to step 1" in capsys.readouterr().out


def _comparable(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["--out", str(whole), "--steps", "4", "--sample-every", "2", *TINY]) == 0
    assert main(["--out", str(split), "--steps", "2", "--sample-every", "2", *TINY]) == 0
    # a step logged after the last checkpoint (a crash before the next one) is dropped on resume
    with (split / "log.jsonl").open("a") as log:
        log.write(json.dumps({"step": 3, "loss_g": 0.0, "loss_d": 0.0}) + "\n")
    assert main(["--out", str(split), "--steps", "4", "--sample-every", "2", "--resume", *TINY]) == 0
    assert _comparable(_log(split)) == _comparable(_log(whole))
    a = torch.load(whole / "checkpoint.pt", weights_only=False)["trainer"]
    b = torch.load(split / "checkpoint.pt", weights_only=False)["trainer"]
    for part in ("generator", "discriminator"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert torch.equal(a["noise_rng"], b["noise_rng"]) and torch.equal(a["data_rng"], b["data_rng"])


def _write_pngs(folder: Path, count: int, size, colour):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", size, tuple((c + 20 * i) % 256 for c in colour)).save(folder / f"{i}.png")


def test_data_folder_with_class_subfolders_trains_a_conditional_model(tmp_path):
    data = tmp_path / "pictures"
    _write_pngs(data / "cats", 3, (40, 24), (200, 30, 30))  # not square: resized and centre-cropped
    _write_pngs(data / "dogs", 3, (16, 16), (30, 30, 200))
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "2", "--data", str(data), *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["n_classes"] == 2 and config["dataset"].startswith("6 images")
    assert [r["step"] for r in _log(out)] == [1, 2]


def test_data_folder_labels_nested_images_by_the_first_folder_below_the_root(tmp_path):
    from fastattn.models.data import folder_dataset

    data = tmp_path / "pictures"
    _write_pngs(data / "cats" / "indoor", 2, (16, 16), (200, 30, 30))
    _write_pngs(data / "cats" / "outdoor" / "garden", 2, (16, 16), (210, 20, 40))
    _write_pngs(data / "dogs", 3, (16, 16), (30, 30, 200))
    dataset = folder_dataset(data, 8)
    assert dataset.class_names == ("cats", "dogs") and len(dataset) == 7
    red = dataset.images[:, 0].float().mean(dim=(1, 2)) > dataset.images[:, 2].float().mean(dim=(1, 2))
    assert dataset.labels.tolist() == [0 if r else 1 for r in red.tolist()]
    assert dataset.labels.bincount().tolist() == [4, 3]


def test_data_folder_without_subfolders_trains_an_unconditional_model(tmp_path):
    data = tmp_path / "flat"
    _write_pngs(data, 4, (20, 20), (10, 200, 10))
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "1", "--data", str(data), *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["n_classes"] == 0


def _run_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (["--attention", "flash"], "--attention: invalid choice: 'flash'"),
        (["--resolution", "30"], "resolution must be a power of two >= 8"),
        (["--g-attn-res", "12"], "--g-attn-res/--resolution/--ch: attn_resolution must be None"),
        (["--d-attn-res", "16"], "--d-attn-res/--resolution/--ch: attn_resolution must be None"),
        (["--device", "quantum"], "--device must be cpu, cuda, cuda:N or auto, got 'quantum'"),
        (["--backend", "nope"], "--backend must be one of"),
        (["--backend", "torch", "--attention", "naive"], "--backend 'torch' applies to --attention fastattn only"),
        (["--data", "/does/not/exist"], "--data must be a folder of images, got '/does/not/exist', which does not exist"),
        (["--resume"], "--resume: no checkpoint.pt in --out"),
        (["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
        (["--lr-g", "-1"], "argument --lr-g: expected a positive finite number, got '-1'"),
    ],
)
def test_bad_arguments_exit_with_a_message_naming_the_argument(tmp_path, capsys, args, message):
    argv = ["--out", str(tmp_path / "run"), "--steps", "1", *TINY, *args]
    if args[0] == "--steps":
        argv = ["--out", str(tmp_path / "run"), *TINY, *args]
    assert message in _run_error(capsys, argv)


def test_empty_data_folder_and_unreadable_image_are_reported(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _run_error(capsys, ["--out", str(tmp_path / "a"), "--data", str(tmp_path / "empty"), *TINY])
    assert "holds no images" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    err = _run_error(capsys, ["--out", str(tmp_path / "b"), "--data", str(broken), *TINY])
    assert "--data: cannot read image" in err and "x.png" in err


def test_existing_run_needs_resume_and_resume_refuses_a_different_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "1", *TINY]) == 0
    err = _run_error(capsys, ["--out", str(out), "--steps", "2", *TINY])
    assert "already holds a run" in err and "--resume" in err
    err = _run_error(capsys, ["--out", str(out), "--steps", "2", "--resume", *TINY[:-1], "--ch", "8"])
    assert "--ch 8 (the run has 4)" in err
