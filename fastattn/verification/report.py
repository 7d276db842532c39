"""What `fastattn.verify` found: per-layer and whole-model checks, timings, and their renderings.

Every error is max |x - x_ref| over all elements, in fp64, where x_ref comes from the original
model run in float64 (its weights and inputs cast from the same state). A check compares the
swapped model's error in one dtype with the original model's own error in that dtype:

    swapped_error <= ratio * original_error + floor[dtype] * max(1, max |x_ref|)

with ratio ERROR_RATIO_OUT for outputs and ERROR_RATIO_GRAD for gradients, and the floors of
fastattn.constants.ERROR_FLOOR (fastattn.accuracy.error_bound, whose floor is absolute: the
kernels' tests use unit-variance inputs; a model's outputs and gradients reach 1e3 and more, so
here the floor is relative to the reference's largest magnitude, absolute below 1). In float64
the original is the reference, so its own error is 0 and the bound is the floor.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

__all__ = ["Check", "LayerReport", "TimingRow", "VerifyReport", "QUANTITIES"]

#: quantity -> what it is, in words (the report's legend)
QUANTITIES = {
    "output": "the output tensors (of the model, or of the layer's call)",
    "input_grad": "gradient of the loss w.r.t. the model's floating-point inputs (for a layer: "
                  "w.r.t. its input x, the total gradient reaching x)",
    "param_grad": "gradients w.r.t. the parameters (for a layer: those under its qualified name)",
    "param_grad2": "second-order: gradients w.r.t. the parameters of sum(input_grad**2) (an R1 penalty)",
    "runs": "the swapped model runs where the original runs",
    "swapped": "every attention-like layer is swapped",
}
_SHORT = {"output": "output", "input_grad": "input grad", "param_grad": "param grad",
          "param_grad2": "2nd-order grad"}


@dataclass
class Check:
    """One comparison, or one thing that must hold ("runs", "swapped", with a message)."""

    quantity: str  # a key of QUANTITIES
    dtype: str | None = None
    mode: str | None = None  # "eval" or "train"
    swapped_error: float | None = None
    original_error: float | None = None
    bound: float | None = None
    ok: bool = True
    worst: str = ""  # which tensor holds the swapped model's largest error
    message: str = ""  # for "runs" / "swapped": what went wrong

    def describe(self, scope: str) -> str:
        """One line, for the list of failures."""
        where = " ".join(filter(None, [scope, self.dtype, self.mode, self.quantity]))
        if self.swapped_error is None:
            return f"FAIL {where}: {self.message}"
        at = f" (worst: {self.worst})" if self.worst else ""
        return (f"FAIL {where}: swapped error {_num(self.swapped_error)} > bound {_num(self.bound)} "
                f"(original's own error {_num(self.original_error)}){at}")


@dataclass
class LayerReport:
    name: str  # qualified name in the model ("" = the model itself)
    module_type: str
    match: str  # "family" (by structure), "traced" (by computation) or "native" (SelfAttention2d)
    family: str  # the family's name, "traced" or "fastattn"
    pattern: str = ""
    probe_error: float | None = None  # swap_attention's probe (None: not probed)
    notes: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or "<model>"

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass
class TimingRow:
    dtype: str
    direction: str  # "fwd" (eval, no grad) or "fwd+bwd" (training mode, gradients of inputs and parameters)
    original_ms: float | None
    swapped_ms: float | None
    original_peak_bytes: int | None
    swapped_peak_bytes: int | None
    note: str = ""


@dataclass
class VerifyReport:
    model: str
    device: str
    environment: dict
    dtypes: list[str]  # run
    skipped_dtypes: dict[str, str]  # dtype -> why not run
    layers: list[LayerReport]
    model_checks: list[Check]
    unswapped: list[str]  # attention-like layers swap_attention left alone, with its reasons
    timings: list[TimingRow] = field(default_factory=list)
    timing_method: str = ""

    @property
    def checks(self) -> list[tuple[str, Check]]:
        """Every check with its scope (the layer's name, or "model"), layers first: a failure names
        the layer it is in before what it does to the whole model."""
        rows = [(layer.label, c) for layer in self.layers for c in layer.checks]
        return rows + [("model", c) for c in self.model_checks]

    @property
    def ok(self) -> bool:
        return all(c.ok for _, c in self.checks)

    @property
    def failures(self) -> list[str]:
        """One line per failing check, naming the layer (or "model"), dtype, mode and quantity."""
        return [c.describe(scope) for scope, c in self.checks if not c.ok]

    # --- renderings -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = {"ok": self.ok, "failures": self.failures, **asdict(self)}
        data["rule"] = _rule()
        data["quantities"] = QUANTITIES
        return _finite(data)

    def to_json(self, indent: int | None = 2) -> str:
        """The whole report as JSON; non-finite errors are written as the strings "inf"/"nan"."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _header(self) -> str:
        n_checks = len(self.checks)
        verdict = "PASS" if self.ok else f"FAIL ({len(self.failures)} of {n_checks} checks failed)"
        env = self.environment
        return (f"fastattn.verify {self.model} on {self.device} (torch {env.get('torch')}, fastattn "
                f"{env.get('fastattn')}, backend {env.get('backend') or 'automatic'}): {verdict}")

    def _layer_lines(self) -> list[str]:
        lines = []
        for layer in self.layers:
            probe = "" if layer.probe_error is None else f", probe max error {layer.probe_error:.2g}"
            how = f" [{layer.pattern}]" if layer.pattern else ""
            lines.append(f"{layer.label} ({layer.module_type}): {layer.match} {layer.family}{how}{probe}")
            lines += [f"  note: {note}" for note in layer.notes]
        lines += [f"not swapped: {line}" for line in self.unswapped]
        lines += [f"{dtype} skipped: {why}" for dtype, why in self.skipped_dtypes.items()]
        return lines

    def _error_table(self) -> tuple[list[str], list[list[str]]]:
        quantities = [q for q in _SHORT if any(c.quantity == q for _, c in self.checks)]
        header = ["scope", "dtype", "mode", *(_SHORT[q] for q in quantities)]
        rows = []
        scopes = [("model", self.model_checks)] + [(layer.label, layer.checks) for layer in self.layers]
        for scope, checks in scopes:
            for dtype in self.dtypes:
                for mode in ("eval", "train"):
                    cells = []
                    for q in quantities:
                        found = [c for c in checks if (c.quantity, c.dtype, c.mode) == (q, dtype, mode)]
                        cells.append(_cell(found[0]) if found else "-")
                    if any(cell != "-" for cell in cells):
                        rows.append([scope, dtype, mode, *cells])
        return header, rows

    def _timing_table(self) -> tuple[list[str], list[list[str]]]:
        header = ["dtype", "direction", "original ms", "swapped ms", "original peak MiB", "swapped peak MiB"]
        rows = [[t.dtype, t.direction, _ms(t.original_ms), _ms(t.swapped_ms), _mib(t.original_peak_bytes),
                 _mib(t.swapped_peak_bytes)] for t in self.timings]
        return header, rows

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, failures: bool = True) -> str:
        """str(report); failures=False leaves out the failing lines (the CLI prints them first)."""
        lines = [self._header(), *(self.failures if failures else []), *self._layer_lines(), ""]
        lines.append("max abs error vs the original in float64, swapped (original's own); ! = over the bound "
                     f"({_rule()})")
        lines += _text_table(*self._error_table())
        notes = [c.describe(scope) for scope, c in self.checks if c.ok and c.message]
        lines += notes
        if self.timings:
            lines += ["", f"time and peak memory ({self.timing_method})"]
            lines += _text_table(*self._timing_table())
            lines += [f"{t.dtype} {t.direction}: {t.note}" for t in self.timings if t.note]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = [f"**{self._header()}**", ""]
        if self.failures:
            lines += [f"- {line}" for line in self.failures] + [""]
        lines += [f"- {line}" for line in self._layer_lines()] + [""]
        lines += [f"Max abs error against the original model run in float64, swapped (original's own "
                  f"in the same dtype); **!** marks a value over the bound ({_rule()}).", ""]
        lines += _md_table(*self._error_table())
        if self.timings:
            lines += ["", f"Time and peak memory ({self.timing_method}).", ""]
            lines += _md_table(*self._timing_table())
        return "\n".join(lines) + "\n"


def _rule() -> str:
    from ..constants import ERROR_RATIO_GRAD, ERROR_RATIO_OUT

    return (f"swapped <= {ERROR_RATIO_OUT:g} x original + floor for outputs, "
            f"{ERROR_RATIO_GRAD:g} x original + floor for gradients; floor: fastattn.constants.ERROR_FLOOR "
            "of the dtype x max(1, largest |reference|)")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.2g}" if value else "0"


def _cell(check: Check) -> str:
    if check.swapped_error is None:
        return "FAIL" if not check.ok else "-"
    return f"{_num(check.swapped_error)} ({_num(check.original_error)}){'' if check.ok else ' !'}"


def _ms(seconds_ms: float | None) -> str:
    return "-" if seconds_ms is None else f"{seconds_ms:.3g}"


def _mib(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.3g}"


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _finite(value):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
