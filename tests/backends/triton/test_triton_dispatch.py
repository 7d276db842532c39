"""The triton backend's place in dispatch, its reasons, its op registration and its configs.

Runs on CPU: the op checks use Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py);
the subprocess tests start Python without it.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastattn import BackendUnavailableError, spatial_attention
from fastattn.dispatch import get_backend, select_backend

triton = pytest.importorskip("triton")
from fastattn.kernels import configs as cfg  # noqa: E402
from fastattn.kernels.autotune import CONFIG_ENV_VAR, interpreting  # noqa: E402

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 before triton is imported")


def _qkv(d_qk=8, n=20, m=12, d_v=16, dtype=torch.float32, batch=1):
    return (torch.randn(batch, d_qk, n, dtype=dtype), torch.randn(batch, d_qk, m, dtype=dtype),
            torch.randn(batch, d_v, m, dtype=dtype))


def _python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "FASTATTN_BACKEND")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_triton_backend_is_named_triton_with_priority_above_torch():
    backend = get_backend("triton")
    assert type(backend).__name__ == "TritonBackend"
    assert backend.priority == 100 > get_backend("torch").priority
    assert backend.unavailable() == []


def test_importing_fastattn_and_running_the_torch_backend_does_not_import_triton():
    result = _python("""
        import sys, torch, fastattn
        assert "triton" not in sys.modules, "import fastattn imported triton"
        q = torch.randn(1, 8, 10); k = torch.randn(1, 8, 6); v = torch.randn(1, 16, 6)
        fastattn.spatial_attention(q, k, v, backend="torch")
        assert "triton" not in sys.modules, "the torch backend imported triton"
    """)
    assert result.returncode == 0, result.stderr


def test_cpu_tensors_without_interpreter_are_refused_with_the_env_var_to_set():
    result = _python("""
        import torch, fastattn
        q = torch.randn(1, 8, 10); k = torch.randn(1, 8, 6); v = torch.randn(1, 16, 6)
        try:
            fastattn.spatial_attention(q, k, v, backend="triton")
        except fastattn.BackendUnavailableError as error:
            print(error)
        else:
            raise SystemExit("backend='triton' ran on CPU without the interpreter")
        assert fastattn.dispatch.select_backend(q, k, v).name == "torch"
    """)
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout


@needs_interpreter
def test_automatic_choice_passes_over_the_interpreter_and_says_why():
    q, k, v = _qkv()
    assert select_backend(q, k, v).name == "torch"
    assert "interpreter" in " ".join(get_backend("triton").not_automatic(q, k, v))
    assert select_backend(q, k, v, "triton").name == "triton"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(dtype=torch.float64), "float64"),
        (dict(d_qk=257), "d_qk=257"),
        (dict(d_v=8193, n=2, m=2), "d_v=8193"),
        (dict(dtype=torch.bfloat16), "bfloat16"),
    ],
    ids=["fp64", "d_qk_257", "d_v_8193", "bf16_on_cpu"],
)
@needs_interpreter
def test_explicit_request_for_unsupported_input_raises_with_the_reason(kwargs, expected):
    q, k, v = _qkv(**kwargs)
    with pytest.raises(BackendUnavailableError, match=expected):
        spatial_attention(q, k, v, backend="triton")


@needs_interpreter
def test_widest_supported_widths_are_accepted():
    q, k, v = _qkv(d_qk=256, n=3, m=2, d_v=1024)
    assert get_backend("triton").unsupported(q, k, v) == []


@needs_interpreter
def test_forward_and_backward_ops_pass_opcheck_under_the_interpreter():
    from fastattn.backends.triton.ops import attention_backward_op, attention_forward_op

    q, k, v = _qkv(d_qk=10, n=19, m=7, d_v=24)
    torch.library.opcheck(attention_forward_op, (q, k, v, 0.5, "ieee"))
    out, lse, stats = attention_forward_op(q, k, v, 0.5, "ieee")
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(attention_backward_op, (grad_out, grad_lse, q, k, v, out, stats, 0.5, "ieee"))
    torch.library.opcheck(attention_backward_op, (grad_out, None, q, k, v, out, stats, 0.5, "ieee"))


@needs_interpreter
def test_spatial_attention_compiles_fullgraph_without_graph_breaks():
    import fastattn

    fastattn.available_backends()  # dispatch loads its backends with importlib, which dynamo cannot trace
    torch._dynamo.reset()

    def loss(q, k, v):
        out, lse = spatial_attention(q, k, v, backend="triton", return_lse=True)
        return out.square().mean() + lse.mean()

    q, k, v = (t.requires_grad_() for t in _qkv(d_qk=10, n=21, m=9, d_v=24))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(q, k, v).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    loss(q, k, v).backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want)


def test_fp32_dot_precision_follows_pytorchs_matmul_setting():
    from fastattn.backends.triton.ops import fp32_dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert fp32_dot_precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert fp32_dot_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


@needs_interpreter
def test_invalid_config_env_var_raises_naming_it(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=CONFIG_ENV_VAR):
        spatial_attention(*_qkv(), backend="triton")


def test_candidates_are_clamped_to_the_shape_and_deduplicated():
    got = cfg.forward_candidates(cfg.FORWARD_CONFIGS, n=20, m=5, d_qk=3, d_v=5, elem_bytes=2)
    assert got and len(set(got)) == len(got)
    for c in got:
        assert c.block_n == 32 and c.block_m == 16 and c.block_dv == 16
    assert len(got) < len(cfg.FORWARD_CONFIGS)


def test_candidates_that_overflow_registers_or_shared_memory_are_pruned_with_a_fallback():
    big = cfg.ForwardConfig(128, 128, 256, num_warps=4, num_stages=4)
    assert cfg.forward_candidates([big], 4096, 4096, 256, 1024, 2) == [cfg.FALLBACK_FORWARD]
    deep = cfg.ForwardConfig(64, 64, 128, num_warps=4, num_stages=4)  # fits once pipelined less deeply
    assert cfg.forward_candidates([deep], 4096, 1024, 64, 256, 4)[0].num_stages < 4
    small = cfg.ForwardConfig(64, 64, 64, num_warps=4, num_stages=2)
    assert cfg.forward_candidates([big, small], 4096, 4096, 24, 96, 2) == [small]
    bwd = cfg.backward_candidates(cfg.BACKWARD_CONFIGS, 4096, 1024, 24, 96, 2, shared_bytes=228 * 1024)
    assert bwd and all(c.block_dv <= 128 for c in bwd)


@pytest.mark.parametrize("aligned, slices", [(True, 4), (False, 8)], ids=["aligned", "ragged"])
def test_wide_dv_backward_recomputes_probabilities_once_per_dv_slice(aligned, slices):
    # d_v 1024, the fixed fp16 configuration: one dK launch (p once per pair) and one dV launch
    # whose programs each recompute p for a 256-wide (ragged launches: 128-wide) value slice
    from fastattn.kernels.offline_compile import record_launches

    n, m = (4096, 1024) if aligned else (4093, 1021)
    bwd = cfg.backward_candidates([cfg.FIXED_BACKWARD], n, m, 64, 1024, 2, aligned=aligned)
    assert bwd[0].dv_slice == 1024 // slices
    launches = record_launches(n, m, 64, 1024, torch.float16, (), bwd)
    dkdv = [(x.kwargs["WITH_DK"], x.kwargs["WITH_DV"], x.grid[1]) for x in launches if "WITH_DV" in x.kwargs]
    assert dkdv == [(True, False, 1), (False, True, slices)]


def test_deterministic_candidates_exclude_atomic_dq():
    kept = cfg.backward_candidates(cfg.BACKWARD_CONFIGS, 4096, 1024, 24, 96, 2, deterministic=True)
    assert kept and not any(c.atomic_dq for c in kept)
    assert any(c.atomic_dq for c in cfg.backward_candidates(cfg.BACKWARD_CONFIGS, 4096, 1024, 24, 96, 2))
    assert not cfg.FIXED_BACKWARD.atomic_dq


@pytest.mark.parametrize("site", ["biggan128_G", "biggandeep256", "cifar_G", "stress_unpooled128"])
def test_fixed_configurations_survive_pruning_at_gan_sites(site):
    from fastattn.shapes import gan_shape

    s = gan_shape(site)
    for elem_bytes in (2, 4):
        _, _, fixed_fwd, fixed_bwd = cfg.tables(elem_bytes)
        fwd = cfg.forward_candidates([fixed_fwd], s.N, s.M, s.d_qk, s.d_v, elem_bytes)
        bwd = cfg.backward_candidates([fixed_bwd], s.N, s.M, s.d_qk, s.d_v, elem_bytes)
        assert fwd[0].block_n == min(fixed_fwd.block_n, s.N), fwd  # not the fallback
        assert bwd[0].block_m == fixed_bwd.block_m, bwd


def test_inputs_beyond_int32_in_sample_offsets_are_refused_with_the_reason():
    # meta tensors: shapes only, no memory
    q = torch.empty(1, 8, 2**31, device="meta", dtype=torch.float16)
    k = torch.empty(1, 8, 16, device="meta", dtype=torch.float16)
    v = torch.empty(1, 4, 16, device="meta", dtype=torch.float16)
    reasons = " ".join(get_backend("triton").unsupported(q, k, v))
    assert "int32 in-sample offsets" in reasons and "2**31" in reasons


def test_strided_views_whose_in_sample_span_passes_int32_are_refused():
    # few elements, but a channel stride of 2**30: offsets within one batch element reach 3 * 2**30
    base = torch.empty(1, 4 * 2**30, device="meta", dtype=torch.float16)
    q = base.as_strided((1, 4, 16), (4 * 2**30, 2**30, 1))
    k = torch.empty(1, 4, 16, device="meta", dtype=torch.float16)
    v = torch.empty(1, 4, 16, device="meta", dtype=torch.float16)
    assert q.numel() == 64
    reasons = " ".join(get_backend("triton").unsupported(q, k, v))
    assert "int32 in-sample offsets" in reasons and f"spans {1 + 3 * 2**30 + 15} elements" in reasons
    assert "int32" not in " ".join(get_backend("triton").unsupported(q.contiguous(), k, v))


def test_autotuned_shape_seen_before_skips_candidates_and_device_query(monkeypatch):
    # the autotuned path, driven on CPU: a cached key must return before any per-call work
    from fastattn.kernels import autotune

    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    monkeypatch.setattr(autotune, "_TUNED", {})
    q, k, v = _qkv(d_qk=8, n=20, m=12, d_v=16)
    calls = []

    def candidates(table, *args, **kwargs):
        calls.append("candidates")
        return [table[0]]

    monkeypatch.setattr(autotune, "_shared_bytes", lambda device: calls.append("device") or None)
    first = autotune._config("forward", q, k, v, "ieee", lambda c: None, candidates, None)
    assert calls == ["device", "candidates"]
    calls.clear()
    assert autotune._config("forward", q, k, v, "ieee", lambda c: None, candidates, None) is first
    assert calls == []


def test_ragged_shapes_get_the_tighter_budgets_and_aligned_ones_keep_the_large_tiles():
    # specialised offline compile (kernels/configs.py): 128x128 forward and 128x64 dK/dV tiles fit
    # aligned launches; ragged ones spill with block_m = 64 forward tiles and all but 64x16 dK/dV
    fwd_aligned = cfg.forward_candidates(cfg.FORWARD_CONFIGS, 4096, 1024, 24, 96, 2, 227 * 1024)
    fwd_ragged = cfg.forward_candidates(cfg.FORWARD_CONFIGS, 4093, 1021, 24, 96, 2, 227 * 1024)
    assert any(c.block_m == 128 for c in fwd_aligned)
    assert fwd_ragged and all(c.block_m <= 32 for c in fwd_ragged)
    bwd_aligned = cfg.backward_candidates(cfg.BACKWARD_CONFIGS, 4096, 1024, 24, 96, 2, 227 * 1024)
    bwd_ragged = cfg.backward_candidates(cfg.BACKWARD_CONFIGS, 4093, 1021, 24, 96, 2, 227 * 1024)
    assert any(c.block_m == 128 and c.block_n == 64 for c in bwd_aligned)
    assert bwd_ragged and all(c.block_m == 64 and c.block_n == 16 for c in bwd_ragged)
    # a channels-last style view of aligned sizes is not aligned: its strides decide
    assert cfg.launch_aligned(4096, 1, 96 * 4096) and not cfg.launch_aligned(4096, 1, 96 * 4093, 3)
