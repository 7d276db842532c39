"""Run files: atomic writes, strict JSON lines that keep NaN, torn last lines, the run lock."""
import errno
import json
import math
import os
import socket

import pytest

from fastattn.models.files import (RunFileError, RunLockedError, atomic_write, atomic_write_text, json_line,
                                   read_jsonl, run_lock)


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "log.jsonl"
    atomic_write_text(path, "old\n")

    class Killed(BaseException):
        pass

    def half_then_killed(file):
        file.write(b"new, but only ha")
        raise Killed

    with pytest.raises(Killed):
        atomic_write(path, half_then_killed)
    assert path.read_text() == "old\n"


def test_a_full_disk_removes_the_tmp_and_says_so(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "{}")

    def disk_full(file):
        file.write(b"{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunFileError, match=rf"the disk is full: writing {path} failed .*partial summary.json.tmp removed"):
        atomic_write(path, disk_full)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"] and path.read_text() == "{}"


def test_non_finite_floats_are_written_as_strict_json_and_read_back(tmp_path):
    row = {"step": 1, "loss_g": math.nan, "loss_d": math.inf, "d_real": -math.inf, "gamma_g": None, "x": 0.5}
    line = json_line(row)
    assert "NaN" not in line.replace('"NaN"', "")  # no bare NaN token
    json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token} in {line}"))
    path = tmp_path / "log.jsonl"
    path.write_text(line)
    (back,), note = read_jsonl(path)
    assert note is None and math.isnan(back["loss_g"]) and back["loss_d"] == math.inf
    assert back["d_real"] == -math.inf and back["gamma_g"] is None and back["x"] == 0.5


def test_a_torn_last_line_is_dropped_with_a_note_and_a_bad_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json_line({"step": 1}) + json_line({"step": 2})[:7])
    rows, note = read_jsonl(path)
    assert rows == [{"step": 1}] and f"{path}: dropped its torn last line 2" in note
    path.write_text(json_line({"step": 1}) + "{garbage\n" + json_line({"step": 3}))
    with pytest.raises(RunFileError, match=rf"{path} line 2 is not a JSON object"):
        read_jsonl(path)


def test_a_locked_folder_refuses_a_second_holder_naming_the_first(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError) as error:
            with run_lock(tmp_path):
                pass
        message = str(error.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and str(tmp_path) in message
    with run_lock(tmp_path):  # released when the holder ends
        pass
