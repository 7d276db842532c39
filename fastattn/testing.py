"""Parity helpers for your own tests and CI (public).

    assert_swap_parity(model, example_inputs, **options)
        fastattn.verify on the model; raises AssertionError with the report's failing lines (and
        the whole report) when a check fails; returns the VerifyReport otherwise.
    assert_close_to_reference(out, ref, dtype=None)
        `out` (computed in `dtype`) elementwise within the tolerance row of `dtype` of
        TOLERANCES (fastattn.constants, the project's one table) around an fp64 reference `ref`.
    opcheck_ops()
        torch.library.opcheck on fastattn's custom operators (the Triton kernels).

Also here (from fastattn.accuracy): max_abs_error, describe_mismatch, assert_close,
error_bound (the accuracy rule: at most 2x / 3x PyTorch's own error in the dtype, plus a floor)
and TOLERANCES.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .accuracy import TOLERANCES, assert_close, describe_mismatch, error_bound, max_abs_error
from .verification import VerifyReport, verify
from .verification.run import DTYPE_NAMES, _dtype_name

__all__ = ["assert_swap_parity", "assert_close_to_reference", "opcheck_ops", "max_abs_error",
           "describe_mismatch", "assert_close", "error_bound", "TOLERANCES"]


def assert_swap_parity(model: torch.nn.Module, example_inputs, **options) -> VerifyReport:
    """Run `fastattn.verify(model, example_inputs, **options)` and fail with its failing lines.

    For pytest::

        def test_my_generator_swaps_with_parity():
            G = build_generator(); G.load_state_dict(torch.load("G.pt"))
            fastattn.testing.assert_swap_parity(G, (torch.randn(4, 128),))
    """
    report = verify(model, example_inputs, **options)
    if not report.ok:
        raise AssertionError("fastattn swap parity failed:\n" + "\n".join(report.failures)
                             + "\n\n" + report.to_text(failures=False))
    return report


def assert_close_to_reference(out: Tensor, ref: Tensor, dtype: torch.dtype | str | None = None,
                              name: str = "output") -> None:
    """Assert `out` matches the fp64 reference `ref` within TOLERANCES[dtype] (default out.dtype):
    |out - ref| <= atol + rtol * |ref| elementwise; the message says where and by how much not."""
    dtype = out.dtype if dtype is None else DTYPE_NAMES[_dtype_name(dtype)]
    assert_close(out, ref, dtype, name=name)


def opcheck_ops(*, device: str | torch.device | None = None, require: bool = False) -> dict[str, str]:
    """torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch) on
    fastattn::attention_forward and fastattn::attention_backward, on small inputs in every dtype
    the device runs them in (CUDA: float16, bfloat16 where supported, float32; CPU: float32,
    under Triton's interpreter only, i.e. TRITON_INTERPRET=1 set before triton was imported).

    Returns {"<op> <dtype>": "ok" or "skipped: <why>"}; raises AssertionError (from opcheck's
    OpCheckError) when a check fails. require=True raises RuntimeError instead of skipping.
    """
    from .backends.triton.backend import load_ops

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    names = ("fastattn::attention_forward", "fastattn::attention_backward")
    why = None
    try:
        ops = load_ops()
        if device.type == "cpu" and not ops.interpreting():
            why = ("on CPU the Triton ops run only under Triton's interpreter: set TRITON_INTERPRET=1 "
                   "before triton is first imported")
    except ImportError as error:
        why = str(error)
    if why is not None:
        if require:
            raise RuntimeError(f"fastattn's custom ops cannot run on {device}: {why}")
        return {f"{name} {device.type}": f"skipped: {why}" for name in names}
    dtypes = [torch.float32]
    if device.type == "cuda":
        dtypes = [torch.float16, *([torch.bfloat16] if torch.cuda.is_bf16_supported() else []), torch.float32]
    results = {}
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        q, k, v = (torch.randn(shape, generator=gen).to(device, dtype)
                   for shape in ((2, 10, 19), (2, 10, 7), (2, 24, 7)))
        try:
            torch.library.opcheck(ops.attention_forward_op, (q, k, v, 0.5, "ieee"))
            results[f"{names[0]} {_dtype_name(dtype)}"] = "ok"
            out, lse, stats = ops.attention_forward_op(q, k, v, 0.5, "ieee")
            grad_out = torch.randn(out.shape, generator=gen).to(device, dtype)
            grad_lse = torch.randn(lse.shape, generator=gen).to(device)
            for g_lse in (grad_lse, None):
                torch.library.opcheck(ops.attention_backward_op, (grad_out, g_lse, q, k, v, out, stats, 0.5, "ieee"))
            results[f"{names[1]} {_dtype_name(dtype)}"] = "ok"
        except Exception as error:  # torch.testing._internal.optests OpCheckError and friends
            raise AssertionError(f"torch.library.opcheck failed for fastattn's ops in {dtype}: "
                                 f"{type(error).__name__}: {error}") from error
    return results
