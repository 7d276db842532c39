"""Property tests over random shapes: the torch backend agrees with the reference, and softmax
structure holds (outputs are convex combinations of values; lse bounds the logits)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastattn import spatial_attention
from fastattn.constants import TOLERANCES
from fastattn.reference import reference_attention
from fastattn.testing import assert_close

dims = st.tuples(
    st.integers(1, 3), st.integers(1, 33), st.integers(0, 70), st.integers(1, 70), st.integers(1, 50)
)


@settings(max_examples=60, deadline=None)
@given(dims=dims, scale=st.floats(0.05, 3.0), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_match_reference_fp64(dims, scale, seed):
    B, d_qk, N, M, d_v = dims
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, d, n, generator=g, dtype=torch.float64) for d, n in ((d_qk, N), (d_qk, M), (d_v, M)))
    out, lse = spatial_attention(q, k, v, scale=scale, backend="torch", return_lse=True)
    want, want_lse = reference_attention(q, k, v, scale=scale, return_lse=True)
    assert_close(out, want, torch.float64, "out")
    assert_close(lse, want_lse, torch.float64, "lse")
    # convex combination: each output channel lies within the range of its values
    slack = TOLERANCES[torch.float64]["rtol"]
    if N:
        assert (out <= v.amax(-1, keepdim=True) + slack).all() and (out >= v.amin(-1, keepdim=True) - slack).all()
        logits = scale * q.transpose(1, 2) @ k
        log_m = torch.log(torch.tensor(float(M), dtype=torch.float64))
        assert (lse >= logits.amax(-1) - slack).all() and (lse <= logits.amax(-1) + log_m + slack).all()
