"""`fastattn bench`: benchmark the attention providers on the GAN attention sites.

    fastattn bench                         # default preset: `gan` on CUDA, `quick` on CPU
    fastattn bench --preset stress --provider naive,sdpa,fastattn-torch --json out.json
    fastattn bench --compare old.json --fail-on-regression

See `fastattn bench --help`, fastattn/bench/measure.py for how time and memory are measured,
and benchmarks/README.md for the committed results.
"""
from __future__ import annotations

from .cli import main

__all__ = ["main"]
