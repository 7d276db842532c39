"""Comparing results with a reference: max errors, readable mismatches, the tolerance table and
the accuracy rule. The low-level half of `fastattn.testing` (which re-exports all of it): the
swap probe and the benchmarks use it, and it imports nothing of fastattn but the constants.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .constants import ERROR_FLOOR, TOLERANCES

__all__ = ["max_abs_error", "describe_mismatch", "assert_close", "error_bound", "TOLERANCES"]


def max_abs_error(got: Tensor, want: Tensor) -> float:
    """Largest |got - want| in fp64, NaN-aware: NaN where exactly one side is NaN, inf on inf mismatch."""
    got64, want64 = got.detach().to(torch.float64), want.detach().to(torch.float64)
    both_nan = got64.isnan() & want64.isnan()
    same_inf = got64.isinf() & (got64 == want64)
    diff = (got64 - want64).abs().masked_fill(both_nan | same_inf, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def describe_mismatch(got: Tensor, want: Tensor, atol: float, rtol: float, name: str = "output") -> str:
    """Where and by how much `got` differs from `want` (for assertion messages)."""
    got64, want64 = got.detach().to(torch.float64), want.detach().to(torch.float64)
    diff = (got64 - want64).abs()
    bad = ~torch.isclose(got64, want64, atol=atol, rtol=rtol, equal_nan=True)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return f"{name}: all {got.numel()} elements within atol={atol:g}, rtol={rtol:g}"
    flat = torch.where(bad, diff.nan_to_num(float("inf")), torch.zeros_like(diff)).flatten().argmax()
    index = tuple(int(i) for i in torch.unravel_index(flat, got.shape))
    return (
        f"{name}: {n_bad} of {got.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); "
        f"worst at index {index}: got {float(got64[index]):.6g}, expected {float(want64[index]):.6g}; "
        f"max abs error {max_abs_error(got, want):.3g}, shape {tuple(got.shape)}"
    )


def assert_close(got: Tensor, want: Tensor, dtype: torch.dtype | None = None, name: str = "output",
                 atol: float | None = None, rtol: float | None = None) -> None:
    """Assert `got` matches `want` within the tolerance table row of `dtype` (default got.dtype)."""
    tol = TOLERANCES[dtype or got.dtype]
    atol = tol["atol"] if atol is None else atol
    rtol = tol["rtol"] if rtol is None else rtol
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    ok = torch.isclose(got.detach().to(torch.float64), want.detach().to(torch.float64),
                       atol=atol, rtol=rtol, equal_nan=True).all()
    assert ok, describe_mismatch(got, want, atol, rtol, name)


def error_bound(naive_error: float, ratio: float, dtype: torch.dtype) -> float:
    """The accuracy rule: at most `ratio` x the naive path's error in the same dtype, plus a floor."""
    return ratio * naive_error + ERROR_FLOOR[dtype]
