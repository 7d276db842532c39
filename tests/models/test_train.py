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


# --- trust: locks, logs, resume consistency, CLI advice, image bounds, kills ----------------------


def test_a_kill_during_the_resume_log_rewrite_loses_no_record(tmp_path, monkeypatch):
    from fastattn.models import train
    from fastattn.models.files import atomic_write

    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "4", "--ckpt-every", "2", *TINY]) == 0
    before = (out / "log.jsonl").read_text()

    class Killed(BaseException):
        pass

    def killed_midway(path, text):
        if Path(path).name != "log.jsonl":
            return atomic_write(path, lambda file: file.write(text.encode()))

        def half(file):
            file.write(text[:len(text) // 2].encode())
            raise Killed

        return atomic_write(path, half)

    monkeypatch.setattr(train, "atomic_write_text", killed_midway)
    with pytest.raises(Killed):
        main(["--out", str(out), "--steps", "6", "--resume", *TINY])
    assert (out / "log.jsonl").read_text() == before
    monkeypatch.undo()
    assert main(["--out", str(out), "--steps", "6", "--resume", *TINY]) == 0
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4, 5, 6]


def test_a_second_run_on_a_locked_out_folder_is_refused_naming_the_holder(tmp_path, capsys):
    import os
    import socket

    from fastattn.models.files import run_lock

    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "1", *TINY]) == 0
    with run_lock(out):
        err = _run_error(capsys, ["--out", str(out), "--steps", "2", "--resume", *TINY])
    assert f"{out} is in use by another fastattn train (pid {os.getpid()} on host {socket.gethostname()}" in err
    assert [r["step"] for r in _log(out)] == [1]


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "2", *TINY]) == 0
    err = _run_error(capsys, ["--out", str(out), "--steps", "1", "--resume", *TINY])
    assert "--resume --steps 1: the run in --out" in err and "is already at step 2" in err
    assert json.loads((out / "config.json").read_text())["steps"] == 2


def test_missing_train_extra_is_named_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError
    out = tmp_path / "run"
    err = _run_error(capsys, ["--out", str(out), "--steps", "1", *TINY])
    assert 'fastattn train needs pillow, which is not installed here: pip install "fastattn[train]"' in err
    assert not out.exists()


@pytest.mark.parametrize("source", ["--backend", "FASTATTN_BACKEND"])
def test_a_backend_that_cannot_run_on_the_device_gets_advice_in_cli_terms(tmp_path, capsys, monkeypatch, source):
    import fastattn.backends.triton.backend as triton_backend

    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)  # as outside the test suite
    argv = ["--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu", *TINY]
    if source == "--backend":
        err = _run_error(capsys, [*argv, "--backend", "triton"])
        assert "--backend triton cannot run" in err
        assert "use --device cuda (the Triton kernels run on CUDA GPUs), or pass --backend torch" in err
    else:
        monkeypatch.setenv("FASTATTN_BACKEND", "triton")
        err = _run_error(capsys, argv)
        assert "FASTATTN_BACKEND=triton (from the environment) cannot run" in err
        assert "unset FASTATTN_BACKEND, or pass --backend torch" in err
    assert "backend=None" not in err and not (tmp_path / "run").exists()


def test_non_finite_losses_are_logged_as_strict_json_and_resume_reads_them(tmp_path, monkeypatch):
    import math

    from fastattn.models.trainer import GANTrainer

    real_step = GANTrainer.train_step

    def nan_d_real(self):
        row = real_step(self)
        row["d_real"] = math.nan
        return row

    monkeypatch.setattr(GANTrainer, "train_step", nan_d_real)
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "2", *TINY]) == 0
    assert main(["--out", str(out), "--steps", "3", "--resume", *TINY]) == 0

    def strict(token):
        raise AssertionError(f"bare {token} in a JSON file")

    rows = [json.loads(line, parse_constant=strict) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["d_real"] == "NaN" for r in rows)
    json.loads((out / "summary.json").read_text(), parse_constant=strict)


def _png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height RGB pixels, with a few bytes of image data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size, message", [
    ((100_000, 100_000), "--data: cannot read image {path}: DecompressionBombError"),
    ((9_000, 9_000), "--data: image {path} is 9000 x 9000 = 81,000,000 pixels, more than the 67,108,864 accepted"),
    ((1, 60_000_000), "--data: image {path} is 1 x 60000000 pixels, an aspect ratio of 60,000,000:1, more than"),
])
def test_image_bombs_are_refused_by_name_before_any_pixel_is_decoded(tmp_path, monkeypatch, size, message):
    import warnings

    from PIL import Image, ImageFile

    from fastattn.models.data import folder_dataset

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # PIL's default
    data = tmp_path / "pictures"
    data.mkdir()
    path = _png(data / "bomb.png", *size)
    assert path.stat().st_size < 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ValueError) as error:
            folder_dataset(data, 8)
    assert message.format(path=path) in str(error.value)


class _Killed(BaseException):
    """A simulated SIGKILL: a BaseException, so no `except Exception`/`except OSError` sees it."""


def _state_equal(a, b, where="checkpoint") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys differ"
        for key in a:
            _state_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where} differs"
        for i, (x, y) in enumerate(zip(a, b)):
            _state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_a_run_killed_twelve_times_at_random_points_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """In-process fault injection (a subprocess per kill would spend its time importing torch).

    Each attempt counts the run's durable events: every os.fsync and os.replace (the steps of each
    atomic write: config, log rewrite, pictures, checkpoint and its previous-checkpoint link),
    every appended log line and every training step. At a seeded random event it raises _Killed
    before that event happens; an appended line is cut in half first, as a kill or a full disk
    inside write() leaves it. Nothing runs on the way out that a SIGKILL would skip (the atomic
    writes clean up only on OSError), except closing files, which the kernel does too. After twelve
    kills (a run may end between two: later kills then hit the resume of a finished run) the run is
    resumed to its end, and its log, checkpoint, config and FD8 must equal those
    of an uninterrupted run: nothing lost, nothing duplicated."""
    import os
    import random

    from fastattn.models import train
    from fastattn.models.checkpoint import load_checkpoint
    from fastattn.models.files import atomic_write_text
    from fastattn.models.trainer import GANTrainer

    argv = ["--steps", "16", "--ckpt-every", "1", "--sample-every", "8", "--resolution", "8", "--ch", "4",
            "--z-dim", "8", "--batch-size", "4", "--n-images", "16", "--g-attn-res", "8", "--d-attn-res", "0",
            "--fd-samples", "8", "--quiet"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # matplotlib takes seconds per plot on a busy machine: write a stand-in atomically instead
    monkeypatch.setattr(train, "plot_losses", lambda rows, path, *a: atomic_write_text(path, str(len(rows))))
    assert main(["--out", str(whole), *argv]) == 0

    real = {"fsync": os.fsync, "replace": os.replace, "append": train._append, "step": GANTrainer.train_step}
    countdown = [0]

    def event() -> bool:
        countdown[0] -= 1
        return countdown[0] == 0

    def fsync(fd):
        if event():
            raise _Killed
        return real["fsync"](fd)

    def replace(src, dst):
        if event():
            raise _Killed
        return real["replace"](src, dst)

    def append(log, path, line):
        if event():
            log.write(line[:len(line) // 2])
            log.flush()
            raise _Killed
        return real["append"](log, path, line)

    def train_step(self):
        if event():
            raise _Killed
        return real["step"](self)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(train, "_append", append)
    monkeypatch.setattr(GANTrainer, "train_step", train_step)
    rng = random.Random(16)
    kills, steps_at_kill = 0, []
    while kills < 12:
        countdown[0] = rng.randint(1, 30)
        resume = ["--resume"] if (killed / "checkpoint.pt").exists() else []
        try:
            main(["--out", str(killed), *argv, *resume])  # may finish before its kill: then the next
        except _Killed:                                   # kills fall in a resume of a finished run
            kills += 1
            steps_at_kill.append(load_checkpoint(killed / "checkpoint.pt")["trainer"]["step"]
                                 if (killed / "checkpoint.pt").exists() else 0)
    countdown[0] = -1
    assert main(["--out", str(killed), *argv, "--resume"]) == 0
    assert len(set(steps_at_kill) - {16}) >= 5, f"the kills should fall across the run, got {steps_at_kill}"

    assert _comparable(_log(killed)) == _comparable(_log(whole))
    assert [r["step"] for r in _log(killed)] == list(range(1, 17)), "a step was lost or duplicated"
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(killed / "checkpoint.pt")
    _state_equal(a["trainer"], b["trainer"], "trainer")
    assert a["config"] == b["config"] and a["extra"]["fd8_initial"] == b["extra"]["fd8_initial"]
    summaries = [json.loads((out / "summary.json").read_text()) for out in (whole, killed)]
    for key in ("steps", "fd8_initial", "fd8_final", "fd8_data_floor", "last_10pct_mean"):
        assert summaries[0][key] == summaries[1][key], key
    assert json.loads((whole / "config.json").read_text()) == json.loads((killed / "config.json").read_text())
    assert not list(killed.rglob("*.tmp"))
