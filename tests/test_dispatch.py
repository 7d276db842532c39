"""Backend choice: automatic picks the best that can run; a named one runs or raises with reasons."""
import subprocess
import sys

import pytest
import torch

from fastattn import BackendUnavailableError, spatial_attention
from fastattn import dispatch
from fastattn.dispatch import Backend, available_backends, select_backend
from fastattn.reference import reference_attention


def qkv():
    return torch.randn(1, 4, 6), torch.randn(1, 4, 5), torch.randn(1, 3, 5)


class _Picky(Backend):
    """A test backend that refuses every input, with a reason, and would win on priority."""
    name, priority = "picky", 10_000

    def unsupported(self, q, k, v):
        return [f"d_qk={q.shape[1]} is not a multiple of 64"]

    def attention(self, q, k, v, scale):  # pragma: no cover - must never be called
        raise AssertionError("a backend that reported reasons was run")


class _Explicit(Backend):
    """Accepts everything but only on explicit request (like Triton's CPU interpreter)."""
    name, priority = "explicit", 9_000

    def unsupported(self, q, k, v):
        return []

    def not_automatic(self, q, k, v):
        return ["only on explicit request"]

    def attention(self, q, k, v, scale):
        return available_backends()["torch"].attention(q, k, v, scale)


@pytest.fixture
def extra_backends(monkeypatch):
    registry = dict(dispatch._REGISTRY)
    monkeypatch.setattr(dispatch, "_REGISTRY", registry)
    dispatch.register_backend(_Picky())
    dispatch.register_backend(_Explicit())
    return registry


def test_cpu_automatic_choice_is_the_torch_backend():
    assert select_backend(*qkv()).name == "torch"


def test_automatic_choice_skips_backends_with_reasons_and_explicit_only_ones(extra_backends):
    assert select_backend(*qkv()).name == "torch"


def test_requested_backend_that_cannot_run_raises_with_its_reasons(extra_backends):
    with pytest.raises(BackendUnavailableError, match=r"(?s)backend 'picky' \(requested by backend=\) cannot run.*d_qk=4 is not a multiple of 64"):
        spatial_attention(*qkv(), backend="picky")


def test_environment_variable_forces_a_backend_and_never_substitutes(extra_backends, monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "picky")
    with pytest.raises(BackendUnavailableError, match=r"requested by the FASTATTN_BACKEND environment variable"):
        spatial_attention(*qkv())
    monkeypatch.setenv("FASTATTN_BACKEND", "explicit")
    assert select_backend(*qkv()).name == "explicit"
    monkeypatch.setenv("FASTATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"FASTATTN_BACKEND must name one of .* got 'nonsense'"):
        spatial_attention(*qkv())


def test_backend_argument_overrides_environment(extra_backends, monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "picky")
    assert select_backend(*qkv(), backend="torch").name == "torch"


def test_when_nothing_can_run_every_backend_and_reason_is_listed(monkeypatch):
    monkeypatch.setattr(dispatch, "_REGISTRY", {"picky": _Picky()})
    with pytest.raises(BackendUnavailableError, match=r"no fastattn backend can run this input:\n  - picky: d_qk=4"):
        spatial_attention(*qkv())


def test_a_backend_whose_kernels_fail_to_load_reports_why(monkeypatch):
    import fastattn.backends.triton as triton_package
    from fastattn.backends.triton import backend as triton_backend

    monkeypatch.delattr(triton_package, "ops", raising=False)
    monkeypatch.setattr(triton_backend, "_ops", None)
    monkeypatch.setattr(triton_backend, "_load_error", None)
    monkeypatch.setitem(sys.modules, "fastattn.backends.triton.ops", None)  # importing it now fails
    report = {row["name"]: row for row in dispatch.backend_report()}
    assert not report["triton"]["available"]
    assert "the Triton kernels failed to load" in report["triton"]["reasons"][0]
    assert "fastattn.backends.triton.ops" in report["triton"]["reasons"][0]
    with pytest.raises(BackendUnavailableError, match="the Triton kernels failed to load"):
        spatial_attention(*qkv(), backend="triton")
    assert report["torch"]["available"]  # a broken optional backend does not break the others


def test_register_backend_rejects_non_backends():
    with pytest.raises(TypeError, match="backend must be a named fastattn.dispatch.Backend"):
        dispatch.register_backend(object())


def test_info_command_lists_backends_and_their_status():
    done = subprocess.run([sys.executable, "-m", "fastattn", "info"], capture_output=True, text=True, check=True)
    assert "torch" in done.stdout and "available" in done.stdout
    assert "triton" in done.stdout


def test_import_fastattn_does_not_import_triton():
    code = "import sys, fastattn; fastattn.spatial_attention; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the remembered choice (spatial_attention's per-signature fast path) -----------------------
class _Counting(Backend):
    """Wins on priority for d_qk == 4, counts how often automatic choice asks it."""
    name, priority = "counting", 50_000

    def __init__(self):
        self.asked = self.ran = 0

    def unsupported(self, q, k, v):
        self.asked += 1
        return [] if q.shape[1] == 4 else ["only d_qk=4"]

    def attention(self, q, k, v, scale):
        self.ran += 1
        return available_backends()["torch"].attention(q, k, v, scale)


def test_a_seen_signature_skips_validation_and_choice_but_a_new_one_does_not(monkeypatch):
    counting = _Counting()
    monkeypatch.setattr(dispatch, "_REGISTRY", {**dispatch._REGISTRY, "counting": counting})
    q, k, v = qkv()
    for _ in range(3):
        spatial_attention(q, k, v)
    assert counting.asked == 1
    spatial_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)  # other strides: asked again
    spatial_attention(q, k, v, scale=0.5)  # another scale
    spatial_attention(q.double(), k.double(), v.double())  # another dtype
    assert counting.asked == 4
    spatial_attention(q, k, v)
    assert counting.asked == 4
    from fastattn.functional import clear_dispatch_cache
    clear_dispatch_cache()
    spatial_attention(q, k, v)
    assert counting.asked == 5


class _Planning(Backend):
    """Counts how often spatial_attention asks it for an out runner (the per-signature strategy)."""
    name, priority = "planning", 50_000

    def __init__(self):
        self.planned = 0

    def unsupported(self, q, k, v):
        return []

    def attention(self, q, k, v, scale):
        return available_backends()["torch"].attention(q, k, v, scale)

    def out_runner(self, q, k, v, scale):
        self.planned += 1
        return super().out_runner(q, k, v, scale)


def test_the_strategy_is_planned_once_per_signature_and_thread_count(monkeypatch):
    planning = _Planning()
    monkeypatch.setattr(dispatch, "_REGISTRY", {**dispatch._REGISTRY, "planning": planning})
    q, k, v = qkv()
    want = spatial_attention(q, k, v, backend="torch")
    for _ in range(3):
        torch.testing.assert_close(spatial_attention(q, k, v), want)
    assert planning.planned == 1
    spatial_attention(q, k, v, return_lse=True)  # (out, lse) takes attention(), no runner
    assert planning.planned == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # a backend may plan by thread count (block budgets)
        spatial_attention(q, k, v)
        assert planning.planned == 2
    finally:
        torch.set_num_threads(threads)
    spatial_attention(q, k, v)
    assert planning.planned == 2


def test_a_remembered_torch_strategy_follows_grad_mode_and_requires_grad():
    q, k, v = qkv()
    want = reference_attention(q, k, v)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    wanted = torch.autograd.grad(reference_attention(*ref_leaves).sum(), ref_leaves)
    for _ in range(2):
        with torch.no_grad():
            assert spatial_attention(q, k, v).grad_fn is None
        plain = spatial_attention(q, k, v)
        assert plain.grad_fn is None  # no input requires grad: no graph either
        torch.testing.assert_close(plain, want)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = spatial_attention(*leaves)
        assert out.grad_fn is not None
        for g, w in zip(torch.autograd.grad(out.sum(), leaves), wanted):
            torch.testing.assert_close(g, w)


def test_the_remembered_choice_follows_the_registry_and_the_environment(monkeypatch):
    q, k, v = qkv()
    plain = spatial_attention(q, k, v)
    assert plain.grad_fn is None  # the torch backend, inference: no graph
    registry = {**dispatch._REGISTRY}
    monkeypatch.setattr(dispatch, "_REGISTRY", registry)
    dispatch.register_backend(_Picky())  # refuses: the torch backend still runs
    torch.testing.assert_close(spatial_attention(q, k, v), plain)
    counting = dispatch.register_backend(_Counting())  # takes the same signature from now on
    spatial_attention(q, k, v)
    assert counting.asked == 1
    monkeypatch.setenv("FASTATTN_BACKEND", "picky")  # the variable is read at every call
    with pytest.raises(BackendUnavailableError, match="picky"):
        spatial_attention(q, k, v)
    monkeypatch.setenv("FASTATTN_BACKEND", "  ")  # blank means unset: the remembered choice again
    spatial_attention(q, k, v)
    assert (counting.asked, counting.ran) == (1, 2)


def test_bad_inputs_raise_at_every_call_and_meta_tensors_still_work():
    q, k, v = qkv()
    for _ in range(2):
        with pytest.raises(ValueError, match="k has d_qk=3"):
            spatial_attention(q, k[:, :3], v)
        with pytest.raises(TypeError, match="return_lse must be a bool"):
            spatial_attention(q, k, v, return_lse=1)
        with pytest.raises(ValueError, match="scale must be finite"):
            spatial_attention(q, k, v, scale=float("nan"))
    meta = [t.to("meta") for t in (q, k, v)]
    for _ in range(2):
        out, lse = spatial_attention(*meta, return_lse=True)
        assert out.device.type == "meta" and out.shape == (1, 3, 6) and lse.shape == (1, 6)
