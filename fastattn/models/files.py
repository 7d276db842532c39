"""Files of a training run that survive kills and full disks: atomic writes, JSON that is always
JSON, and a lock so that one run at a time owns an output folder.

Every whole-file write goes to `<name>.tmp`, is fsynced and then renamed over `<name>`, so a
reader sees the old file or the new one, never a part of either. A write that fails (a full disk)
removes its `.tmp` and raises RunFileError saying so; a `.tmp` left by a killed process is removed
by `remove_stale_tmp` once the next run holds the lock. The one file that grows (log.jsonl) is
appended a whole line per write; a kill can tear only its last line, which `read_jsonl` drops.
"""
from __future__ import annotations

import errno
import json
import math
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, IO

__all__ = ["RunFileError", "RunLockedError", "atomic_write", "atomic_write_text", "fsync_dir",
           "json_safe", "json_line", "read_jsonl", "run_lock", "remove_stale_tmp", "TMP_SUFFIX",
           "LOCK_NAME"]

TMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Non-finite floats are not JSON: they are written as these strings (JavaScript's spellings) and
# read back as floats, so a NaN loss stays a NaN and is never confused with null ("not measured").
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class RunFileError(RuntimeError):
    """A file of the run could not be written or read; the message names it and says what to do."""


class RunLockedError(RunFileError):
    """Another process holds the output folder."""


def _write_error(path: Path, error: OSError) -> RunFileError:
    if error.errno in _DISK_FULL:
        return RunFileError(f"the disk is full: writing {path} failed ({error.strerror}). {path.name} was "
                            f"left as it was and the partial {path.name}{TMP_SUFFIX} removed; free some "
                            f"space and run again")
    return RunFileError(f"cannot write {path}: {error}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object],
                 before_replace: Callable[[], object] | None = None) -> Path:
    """Call write(file) on `<path>.tmp`, fsync it, call before_replace() and rename it over `path`.

    On an OSError (a full disk) the `.tmp` is removed and RunFileError raised; any other
    exception propagates and leaves the `.tmp`, as a killed process would (remove_stale_tmp)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except OSError as error:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise _write_error(path, error) from error
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda file: file.write(data))


def json_safe(value):
    """`value` with every non-finite float replaced by "NaN", "Infinity" or "-Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(row: dict) -> str:
    """One JSON object and a newline; strict JSON (no bare NaN) whatever the floats are."""
    return json.dumps(json_safe(row), allow_nan=False) + "\n"


def _from_json(row: dict) -> dict:
    return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}


def read_jsonl(path: str | Path) -> tuple[list[dict], str | None]:
    """The objects of a JSON-lines file, and a note when its last line was torn (a write cut
    short by a kill or a full disk: that line is dropped). A bad line before the last raises
    RunFileError naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFileError(f"cannot read {path}: {error}") from error
    lines = text.split("\n")
    rows, note = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a {type(row).__name__}, not an object")
        except ValueError as error:
            if number == len(lines) and not text.endswith("\n"):
                note = f"{path}: dropped its torn last line {number} (an interrupted write)"
                break
            raise RunFileError(f"{path} line {number} is not a JSON object ({error}): the file was "
                               f"changed or damaged; restore it or remove the line") from error
        rows.append(_from_json(row))
    return rows, note


def remove_stale_tmp(folder: Path, names) -> list[Path]:
    """Remove `<name>.tmp` for each of `names` (paths relative to `folder`, glob patterns allowed)
    in `folder`: left by a killed or disk-full run. Call only while holding the lock."""
    removed = []
    for name in names:
        for tmp in folder.glob(name + TMP_SUFFIX):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# msvcrt locks a byte range; the lock sits far past the holder line so that others can read it.
_WINDOWS_LOCK_OFFSET = 1 << 20


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            import msvcrt

            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            return False
        raise
    return True


@contextmanager
def run_lock(folder: str | Path, what: str = "fastattn train"):
    """Hold `folder/.lock` for the duration, or raise RunLockedError naming the holder (its pid,
    host and start time). The operating system releases the lock when the holder dies, so a
    killed run never leaves the folder locked."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise RunFileError(f"cannot create the lock file {path}: {error}") from error
    try:
        if not _try_lock(fd):
            try:
                holder = path.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                holder = ""
            raise RunLockedError(
                f"{folder} is in use by another {what} "
                f"({holder or 'a process that has not written its pid yet'}; lock file {path}): "
                f"wait for it to finish or stop it, or choose another output folder")
        holder = f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (holder + "\n").encode())
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting run)
