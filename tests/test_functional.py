"""Every bad input to spatial_attention raises TypeError/ValueError naming the argument, what was
received and what was expected; edge cases that are valid behave like the reference."""
import math

import pytest
import torch

from fastattn import spatial_attention
from fastattn.reference import reference_attention


def qkv(B=2, d_qk=8, N=6, M=5, d_v=4, dtype=torch.float32):
    return (torch.randn(B, d_qk, N, dtype=dtype), torch.randn(B, d_qk, M, dtype=dtype),
            torch.randn(B, d_v, M, dtype=dtype))


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_wrong_number_of_dims_names_argument_and_shape(arg):
    inputs = dict(zip("qkv", qkv()))
    inputs[arg] = inputs[arg][0]  # drop the batch dim
    with pytest.raises(ValueError, match=rf"^{arg} must have 3 dimensions .* got 2 dimensions with shape \("):
        spatial_attention(**inputs)


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_non_tensor_input_is_a_type_error(arg):
    inputs = dict(zip("qkv", qkv()))
    inputs[arg] = inputs[arg].tolist()
    with pytest.raises(TypeError, match=rf"^{arg} must be a torch.Tensor .* got list"):
        spatial_attention(**inputs)


def test_batch_mismatch_names_both_shapes_and_expected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k has batch size 3 .*\(3, 8, 5\).* q has batch size 2 .*expected k of shape \(2, 8, 5\)"):
        spatial_attention(q, torch.randn(3, 8, 5), v)
    with pytest.raises(ValueError, match=r"v has batch size 1 .*expected v of shape \(2, 4, 5\)"):
        spatial_attention(q, k, torch.randn(1, 4, 5))


def test_d_qk_mismatch_names_expected_width():
    q, _, v = qkv()
    with pytest.raises(ValueError, match=r"k has d_qk=10 channels \(shape \(2, 10, 5\)\) but q has d_qk=8 .*expected k of shape \(2, 8, M\)"):
        spatial_attention(q, torch.randn(2, 10, 5), v)


def test_key_value_count_mismatch_names_expected_M():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"v has M=7 keys/values .* but k has M=5 .*expected v of shape \(2, d_v, 5\)"):
        spatial_attention(q, k, torch.randn(2, 4, 7))


def test_zero_keys_is_a_value_error():
    q = torch.randn(2, 8, 6)
    with pytest.raises(ValueError, match=r"M=0 keys .*expected M >= 1"):
        spatial_attention(q, torch.randn(2, 8, 0), torch.randn(2, 4, 0))


def test_dtype_mismatch_is_a_type_error_naming_both_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"v has dtype torch.float64 but q has dtype torch.float32"):
        spatial_attention(q, k, v.double())


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_dtype_is_a_type_error(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"q must have a floating dtype .* got {dtype}"):
        spatial_attention(q.to(dtype), k, v)


def test_device_mismatch_is_a_value_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k is on meta but q is on cpu"):
        spatial_attention(q, k.to("meta"), v)


@pytest.mark.parametrize("scale,error,pattern", [
    ("2", TypeError, r"scale must be a real number or None, got str"),
    (True, TypeError, r"scale must be a real number or None, got bool"),
    (math.inf, ValueError, r"scale must be finite, got inf"),
    (math.nan, ValueError, r"scale must be finite, got nan"),
    (10**400, ValueError, r"scale must be finite, got an integer of 401 digits, beyond the largest float"),
    (-10**400, ValueError, r"scale must be finite, got an integer of 401 digits"),
])
def test_bad_scale_is_rejected(scale, error, pattern):
    with pytest.raises(error, match=pattern):
        spatial_attention(*qkv(), scale=scale)


def test_bad_return_lse_and_backend_types():
    with pytest.raises(TypeError, match=r"return_lse must be a bool, got int"):
        spatial_attention(*qkv(), return_lse=1)
    with pytest.raises(TypeError, match=r"backend must be a str or None, got int"):
        spatial_attention(*qkv(), backend=3)
    with pytest.raises(ValueError, match=r"backend must be one of \[.*'torch'.*\] or None \(automatic\), got 'cuda'"):
        spatial_attention(*qkv(), backend="cuda")


def test_zero_queries_returns_empty_output_and_lse():
    q, k, v = qkv(N=0)
    out, lse = spatial_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 4, 0) and lse.shape == (2, 0)


def test_scale_none_means_one_over_sqrt_d_qk():
    q, k, v = qkv(dtype=torch.float64)
    got = spatial_attention(q, k, v, scale=None)
    want = reference_attention(q, k, v, scale=1 / math.sqrt(8))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, reference_attention(q, k, v))  # the scale really changed it


# NaN/inf inputs on purpose: the interpreter's numpy warns about the invalid values it computes
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_nan_and_inf_inputs_propagate_exactly_like_the_reference(backend, dtype):
    from fastattn.dispatch import get_backend

    torch.manual_seed(0)
    q, k, v = qkv(B=1, N=5, M=4, dtype=dtype)
    q[0, 0] = torch.tensor([-1.0, float("nan"), 1.0, -2.0, 0.5])  # query 1: all logits NaN
    k[0, 0, 2] = float("inf")     # key 2: -inf logit for queries 0 and 3, +inf (NaN row) for 2 and 4
    v[0, 1, 3] = float("-inf")    # value channel 1 of key 3: -inf in that channel where key 3 counts
    reasons = get_backend(backend).reasons(q, k, v)
    if reasons:
        pytest.skip(f"{backend} cannot run here: {reasons}")
    got = spatial_attention(q, k, v, backend=backend)
    want = reference_attention(q.double(), k.double(), v.double())
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite].double(), want[finite])
    assert finite.any() and (~finite).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_meta_tensors_give_empty_meta_results_of_the_right_shapes(dtype):
    q, k, v = (t.to("meta") for t in qkv(B=2, d_qk=8, N=6, M=5, d_v=4, dtype=dtype))
    out, lse = spatial_attention(q, k, v, return_lse=True, backend="torch")
    assert out.device.type == "meta" and out.shape == (2, 4, 6) and out.dtype == dtype
    assert lse.device.type == "meta" and lse.shape == (2, 6)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert spatial_attention(q, k, v).shape == (2, 4, 6)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'nope'"):
        spatial_attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match=r"v has M=7 keys/values"):  # still validated
        spatial_attention(q, k, torch.empty(2, 4, 7, device="meta", dtype=dtype))


def test_a_remembered_signature_still_rejects_k_or_v_on_another_device():
    """The per-signature cache holds every tensor's device: a call that differs from a remembered
    one only in k's or v's device is validated again, not run (torch would return a meta result)."""
    q, k, v = (torch.randn(1, 4, 8) for _ in range(3))
    spatial_attention(q, k, v)
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        spatial_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        spatial_attention(q, k, v.to("meta"))
