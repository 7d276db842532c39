"""Checkpoints of `fastattn train`: plain data that loads without running code, with a checksum.

A checkpoint is one `torch.save` file of plain dicts, lists, tuples, strings, numbers and tensors
(RNG states are tensors or tuples of ints), so `torch.load(..., weights_only=True)` reads it and a
file that asks the unpickler for anything else (os.system, say) is refused before it runs. Next to
its payload the dict holds

    "format": "fastattn.train checkpoint", "format_version": 1,
    "sha256": hex digest of the payload's canonical encoding (dtypes, shapes and bytes of every
              tensor, repr of every other value, in order)

so `torch.load(path)["trainer"]` still works for a user, and bytes that change on disk (a flipped
bit in a weight) are caught before they train on garbage. The digest is of the loaded content,
not of the file's bytes: it does not depend on how torch lays out the zip.

A save keeps the checkpoint it replaces as `<name>.prev.pt` (a hard link, no copy), so a damaged
checkpoint never costs more than the interval between two.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
from pathlib import Path

import torch

from .files import TMP_SUFFIX, RunFileError, atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "previous_checkpoint", "payload_sha256",
           "FORMAT", "FORMAT_VERSION"]

FORMAT, FORMAT_VERSION = "fastattn.train checkpoint", 1
_ENVELOPE = ("format", "format_version", "sha256")
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class CheckpointError(RunFileError):
    """A checkpoint that cannot be used: `path` and what is wrong with it (`problem`)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path} {problem}")
        self.path, self.problem = Path(path), problem


def previous_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def _update(digest, value) -> None:
    """Feed `value` into `digest` in a canonical, type-tagged encoding (plain data only)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key, item in value.items():
            _update(digest, key)
            _update(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for item in value:
            _update(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, (torch.dtype, torch.device, torch.Size)):
        digest.update(f"{type(value).__name__}:{value};".encode())
    else:
        raise TypeError(f"a checkpoint holds plain data only, got {type(value).__name__}")


def payload_sha256(payload: dict) -> str:
    digest = hashlib.sha256()
    _update(digest, {k: v for k, v in payload.items() if k not in _ENVELOPE})
    return digest.hexdigest()


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Atomically write `payload` (plain data) with its checksum to `path`, keeping the checkpoint
    it replaces as previous_checkpoint(path)."""
    path = Path(path)
    state = {**payload, "format": FORMAT, "format_version": FORMAT_VERSION, "sha256": payload_sha256(payload)}

    def keep_previous() -> None:  # a hard link: no copy, and `path` exists at every moment
        if not path.exists():
            return
        previous = previous_checkpoint(path)
        link = previous.with_name(previous.name + TMP_SUFFIX)
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError as error:
            if error.errno in _NO_HARD_LINKS:
                return  # a filesystem without hard links: no previous checkpoint is kept
            raise
        os.replace(link, previous)

    return atomic_write(path, lambda file: torch.save(state, file), before_replace=keep_previous)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _unpickler_detail(error: BaseException) -> str:
    """The reason in torch's weights-only refusal ("Unsupported global: GLOBAL posix.system ..."),
    without the generic advice around it (which suggests weights_only=False: never do that here)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    """The payload of the checkpoint at `path`, verified, or CheckpointError saying what is wrong.

    Nothing in the file can run code: it is unpickled with weights_only=True, which refuses
    every global that is not a tensor or plain data."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise CheckpointError(path, f"cannot be read: {error}") from error
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes): its write never finished")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _unpickler_detail(error)
        if "global" in detail.lower():
            raise CheckpointError(path, f"was refused unread: it asks to build objects that a checkpoint never "
                                  f"holds, so it was not written by fastattn train and loading it could run "
                                  f"code ({detail})") from None
        raise CheckpointError(path, f"is not a checkpoint or is truncated ({detail})") from None
    except Exception as error:  # torch raises RuntimeError/EOFError/ValueError/... for damaged zips
        raise CheckpointError(path, f"is not a checkpoint or is truncated ({_first_line(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}, not a fastattn train checkpoint (a dict)")
    if state.get("format") != FORMAT:
        raise CheckpointError(path, "is not a fastattn train checkpoint: it lacks the format tag and checksum "
                              "that fastattn train writes (a foreign file, or one from an older fastattn)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"has format version {state.get('format_version')!r}; this fastattn reads "
                              f"version {FORMAT_VERSION}")
    missing = [key for key in ("sha256", *required) if key not in state]
    if missing:
        raise CheckpointError(path, f"lacks {', '.join(repr(k) for k in missing)} "
                              f"(it has {', '.join(repr(k) for k in state)})")
    try:
        actual = payload_sha256(state)
    except TypeError as error:
        raise CheckpointError(path, f"holds data a checkpoint never holds ({error})") from None
    if actual != state["sha256"]:
        raise CheckpointError(path, f"is damaged: its contents do not match the sha256 checksum stored in it "
                              f"(bytes changed on disk after it was written)")
    return {k: v for k, v in state.items() if k not in _ENVELOPE}
