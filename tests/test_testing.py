"""fastattn.testing, the public parity helpers: assert_swap_parity, assert_close_to_reference, opcheck_ops."""
import sys
from pathlib import Path

import pytest
import torch

from fastattn.reference import reference_attention
from fastattn.functional import spatial_attention
from fastattn.testing import assert_close_to_reference, assert_swap_parity, opcheck_ops

sys.path.insert(0, str(Path(__file__).resolve().parent / "verification"))
from verify_models import generator, make_tampered_model  # noqa: E402


def test_assert_swap_parity_returns_the_report_and_raises_with_the_failing_layer(one_thread):
    report = assert_swap_parity(generator(), torch.randn(2, 16), dtypes=("float32",), timing=False)
    assert report.ok
    model = make_tampered_model()  # its layer "1" swapped, then given a wrong logit scale
    with pytest.raises(AssertionError, match=r"fastattn swap parity failed:\nFAIL 1 float32 eval output"):
        assert_swap_parity(model, torch.randn(2, 3, 4, 5), dtypes=("float32",), timing=False)


def test_assert_close_to_reference_uses_the_tolerance_row_of_the_dtype():
    q, k, v = (torch.randn(2, 8, n, dtype=torch.float64) for n in (30, 12, 12))
    ref = reference_attention(q, k, v)
    out = spatial_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="torch")
    assert_close_to_reference(out, ref)  # bf16 row
    assert_close_to_reference(out.float(), ref, "bf16")
    with pytest.raises(AssertionError, match="elements differ"):
        assert_close_to_reference(out.float(), ref, torch.float32)


def test_opcheck_ops_checks_both_ops_or_says_why_not():
    results = opcheck_ops()
    assert len(results) == 2
    from fastattn.kernels.autotune import interpreting

    if torch.cuda.is_available() or interpreting():
        assert set(results.values()) == {"ok"}
    else:
        assert all(r.startswith("skipped: ") for r in results.values())
        with pytest.raises(RuntimeError, match="cannot run"):
            opcheck_ops(require=True)
