"""`fastattn.verify` and `fastattn verify`: check that a model with fastattn swapped in is still the model.

    run.py     verify(model, example_inputs): the runs, side by side, and the checks
    report.py  VerifyReport: checks per layer and for the whole model, timings, JSON / markdown / text
    cli.py     `fastattn verify --model pkg.module:factory --input 2,3,64,64`

The package is not named `verify` so that `fastattn.verify`, the function, is never shadowed by
(or shadows) a module of that name.
"""
from .report import Check, LayerReport, TimingRow, VerifyReport
from .run import VerifyUsageError, verify

__all__ = ["verify", "VerifyReport", "VerifyUsageError", "LayerReport", "Check", "TimingRow"]
