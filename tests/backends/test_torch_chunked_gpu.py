"""The torch backend on CUDA (skipped without a CUDA device): parity and bounded memory."""
import pytest
import torch

from fastattn import spatial_attention
from fastattn.reference import reference_attention
from fastattn.shapes import gan_shape
from fastattn.testing import assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("site_id", ["biggan128_G", "cub128_D", "sagan64_unpooled_G"])
def test_cuda_forward_and_gradients_match_fp64_reference(site_id, dtype):
    s = gan_shape(site_id)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, d, n, device="cuda", generator=g).to(dtype).requires_grad_()
               for d, n in ((s.d_qk, s.N), (s.d_qk, s.M), (s.d_v, s.M)))
    grad_out = torch.randn(2, s.d_v, s.N, device="cuda", generator=g).to(dtype)
    out = spatial_attention(q, k, v, backend="torch")
    out.backward(grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference_attention(q64, k64, v64)
    want.backward(grad_out.double())
    assert_close(out, want, dtype, name="out")
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        # gradients sum over N queries: compare relative to their scale
        scale = float(b.grad.abs().max())
        assert_close(a.grad / scale, b.grad / scale, dtype, name=name)


def test_cuda_memory_does_not_hold_the_attention_matrix():
    s = gan_shape("stress_unpooled128")  # N = M = 16384: the naive matrix is 1 GiB in fp32
    q, k, v = (torch.randn(1, d, n, device="cuda", requires_grad=True)
               for d, n in ((s.d_qk, s.N), (s.d_qk, s.M), (s.d_v, s.M)))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    spatial_attention(q, k, v, backend="torch").sum().backward()
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    assert growth < s.N * s.M * 4 // 8, f"peak growth {growth / 2**20:.0f} MiB"
