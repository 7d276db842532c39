"""argparse value types shared by the command lines (`fastattn bench`, `fastattn train`)."""
from __future__ import annotations

import argparse

__all__ = ["number_type"]


def number_type(kind: type, *, minimum: float = 0, strict: bool = False, what: str | None = None):
    """An argparse `type=`: a finite int/float >= minimum (> minimum when strict). argparse puts
    the option's name in front of the message: "argument --steps: expected a positive integer, got 0"."""
    noun = "integer" if kind is int else "number"
    if what is None:
        what = (f"a positive {noun}" if strict and minimum == 0
                else f"an {noun} > {minimum:g}" if strict else f"an {noun} >= {minimum:g}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse
