"""What `swap_attention` did: the layers swapped and skipped (with reasons), revert and recording."""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from .forward import SwapState, ThreadRecorder

__all__ = ["SwapHandle", "SwappedLayer", "SkippedLayer"]

_RECORDING_LOCK = threading.Lock()  # guards SwapState.recorder across threads opening recordings


@dataclass(frozen=True)
class SwappedLayer:
    name: str  # qualified name in the model ("" for the model itself)
    family: str  # the family's name, "traced" (captured by computation) or "fastattn"
    module_type: str
    pattern: str = ""  # the matched core in one line
    max_error: float | None = None  # the probe's largest difference (None: not probed)

    def __str__(self) -> str:
        err = "" if self.max_error is None else f", probe max error {self.max_error:.2g}"
        how = f" [{self.pattern}]" if self.pattern else ""
        return f"swapped {self.name or '<model>'} ({self.module_type}) as {self.family}{how}{err}"


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    module_type: str
    reasons: dict  # family name -> list of reasons it is not that family

    def __str__(self) -> str:
        why = "; ".join(f"as {fam}: {', '.join(r)}" for fam, r in self.reasons.items())
        return f"{self.name or '<model>'} ({self.module_type}) not swapped: {why}"


class SwapHandle:
    """What `swap_attention` did. `swapped`, `skipped` (with reasons) and `already_swapped` list
    the layers; `revert()` restores them; usable as a context manager (reverts on exit)."""

    def __init__(self):
        self.swapped: list[SwappedLayer] = []
        self.skipped: list[SkippedLayer] = []
        self.already_swapped: list[SwappedLayer] = []
        self._installed: list[tuple[SwappedLayer, object]] = []  # (record, revert() -> bool)
        self._states: list[tuple[str, SwapState]] = []

    def __repr__(self) -> str:
        return (f"SwapHandle(swapped={[(s.name, s.family) for s in self.swapped]}, "
                f"skipped={[s.name for s in self.skipped]}, "
                f"already_swapped={[s.name for s in self.already_swapped]})")

    def summary(self) -> str:
        lines = [str(s) for s in self.swapped]
        lines += [f"already swapped {s.name or '<model>'} as {s.family}" for s in self.already_swapped]
        lines += [str(s) for s in self.skipped]
        return "\n".join(lines) or "no attention layers found"

    def revert(self) -> list[str]:
        """Give the swapped modules their own forward back. Returns the names reverted."""
        reverted = [record.name for record, revert in self._installed if revert()]
        self._installed, self._states = [], []
        return reverted

    def __enter__(self) -> "SwapHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    @contextlib.contextmanager
    def recording(self):
        """Collect the attention of every swapped layer call made by this thread while the block
        runs: yields {name: [AttentionMap, ...]}. Calls from other threads (a data loader, a
        second model user) are not collected; each thread may open its own recording. Nested
        recordings in one thread: the inner one collects until it ends, then the outer again.
        (fastattn's own SelfAttention2d layers are not recorded: use their attention_map(x).)"""
        maps: dict[str, list] = {}
        states = list(self._states)
        thread = threading.get_ident()
        outer = []
        with _RECORDING_LOCK:
            for name, state in states:
                if state.recorder is None:
                    state.recorder = ThreadRecorder()
                outer.append(state.recorder.lists.get(thread))
                state.recorder.lists[thread] = maps.setdefault(name, [])
        try:
            yield maps
        finally:
            with _RECORDING_LOCK:
                for (_, state), previous in zip(states, outer):
                    if state.recorder is None:
                        continue
                    if previous is None:
                        state.recorder.lists.pop(thread, None)
                    else:
                        state.recorder.lists[thread] = previous
                    if not state.recorder.lists:
                        state.recorder = None
