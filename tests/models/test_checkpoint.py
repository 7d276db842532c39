"""Checkpoints of `fastattn train`: nothing in one can run code, and a damaged or foreign one is
refused with a message naming the file and saying what to do."""
import errno
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from fastattn.models.checkpoint import (CheckpointError, load_checkpoint, payload_sha256, previous_checkpoint,
                                        save_checkpoint)
from fastattn.models.train import main

TINY = ["--resolution", "8", "--ch", "4", "--z-dim", "8", "--batch-size", "4", "--n-images", "16",
        "--g-attn-res", "8", "--d-attn-res", "0", "--fd-samples", "0", "--sample-every", "0", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread")


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): a stand-in for os.system in a crafted checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint at each step (so a previous checkpoint exists)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["--out", str(out), "--steps", "2", "--ckpt-every", "1", *TINY]) == 0
    return out


def _resume_error(capsys, out: Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--steps", "3", "--resume", *TINY])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "log.jsonl"):
        (out / name).write_bytes((run / name).read_bytes())
    return out


def test_a_saved_checkpoint_loads_with_weights_only_and_carries_its_checksum(run):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["step"] == 2 and state["sha256"] == payload_sha256(state)
    assert load_checkpoint(run / "checkpoint.pt")["trainer"]["step"] == 2
    assert load_checkpoint(previous_checkpoint(run / "checkpoint.pt"))["trainer"]["step"] == 1


@pytest.mark.parametrize("hidden", [False, True], ids=["whole-file", "in-a-metadata-field"])
def test_a_checkpoint_whose_unpickling_runs_code_is_refused_before_it_runs(tmp_path, capsys, run, hidden):
    out = _copy_run(run, tmp_path)
    marker = tmp_path / "pwned"
    if hidden:  # a genuine-looking checkpoint with the payload in "extra"
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        state["extra"] = {"seconds": 1.0, "note": _CreatesAFile(marker)}
        torch.save(state, out / "checkpoint.pt")
    else:
        with open(out / "checkpoint.pt", "wb") as file:
            pickle.dump(_CreatesAFile(marker), file, protocol=2)  # torch's own protocol
    err = _resume_error(capsys, out)
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert str(out / "checkpoint.pt") in err and "refused unread" in err and "could run code" in err


def _tensor_data_span(data: bytes) -> tuple[int, int]:
    """Offset and length of the largest tensor storage inside a torch.save zip (stored uncompressed)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename and ".data" not in i.filename),
                   key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _damage(kind: str, path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "random-bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "wrong-type":
        torch.save([torch.zeros(3)], path)
    elif kind == "key-missing":
        state = torch.load(path, weights_only=True)
        del state["trainer"]
        torch.save(state, path)
    elif kind == "flipped-bytes":
        start, length = _tensor_data_span(data)
        damaged = bytearray(data)
        for i in range(50):
            damaged[start + (i * 7919) % length] ^= 0xFF
        path.write_bytes(bytes(damaged))
    elif kind == "no-checksum":  # an older or foreign writer
        state = torch.load(path, weights_only=True)
        torch.save({k: v for k, v in state.items() if k not in ("format", "format_version", "sha256")}, path)


@pytest.mark.parametrize("kind, problem", [
    ("truncated", "is not a checkpoint or is truncated"),
    ("zero-bytes", "is empty (0 bytes)"),
    ("random-bytes", "is not a checkpoint or is truncated"),
    ("wrong-type", "holds a list, not a fastattn train checkpoint"),
    ("key-missing", "lacks 'trainer'"),
    ("flipped-bytes", "is damaged: its contents do not match the sha256 checksum"),
    ("no-checksum", "is not a fastattn train checkpoint: it lacks the format tag and checksum"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_good_one(tmp_path, capsys, run,
                                                                                  kind, problem):
    out = _copy_run(run, tmp_path)
    ckpt = out / "checkpoint.pt"
    _damage(kind, ckpt)
    with pytest.raises(CheckpointError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(ckpt, required=("trainer",))
    err = _resume_error(capsys, out)
    assert f"--resume: {ckpt} {problem}" in err
    assert f"the previous one is {out / 'checkpoint.prev.pt'}; move it to {ckpt} and pass --resume again" in err
    assert "Traceback" not in err


def test_resuming_from_the_previous_checkpoint_after_damage_continues_the_run(tmp_path, capsys, run):
    out = _copy_run(run, tmp_path)
    _damage("flipped-bytes", out / "checkpoint.pt")
    os.replace(out / "checkpoint.prev.pt", out / "checkpoint.pt")
    assert main(["--out", str(out), "--steps", "3", "--resume", *TINY]) == 0
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]


def _rows(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_full_disk_while_saving_removes_the_tmp_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"trainer": {"step": 1}}, path)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, file):
        real_save(obj, file)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(Exception, match=r"the disk is full: writing .*checkpoint.pt failed \(No space left on device\)"):
        save_checkpoint({"trainer": {"step": 2}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert path.read_bytes() == before


def test_train_says_the_disk_is_full_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def disk_full_at_step_2(obj, file):
        if isinstance(obj, dict) and obj.get("trainer", {}).get("step") == 2:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, file)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--steps", "3", "--ckpt-every", "1", *TINY])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "checkpoint.pt" in err and "--resume" in err
    assert not list(out.rglob("*.tmp"))
    assert load_checkpoint(out / "checkpoint.pt")["trainer"]["step"] == 1


def test_a_stale_tmp_left_by_a_killed_run_is_removed_at_the_next_start(tmp_path, run):
    out = _copy_run(run, tmp_path)
    (out / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    (out / "samples").mkdir()
    (out / "samples" / "step_000002.png.tmp").write_bytes(b"half a png")
    (out / "notes.txt.tmp").write_bytes(b"not ours: kept")
    assert main(["--out", str(out), "--steps", "2", "--resume", *TINY]) == 0
    assert [p.name for p in out.rglob("*.tmp")] == ["notes.txt.tmp"]
