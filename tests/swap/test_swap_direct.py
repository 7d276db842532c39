"""Layers captured by computation run their forward as written where capturing cannot pay (CPU,
automatic backend, core matrix within SWAP_DIRECT_MAX_BYTES), decided per call signature; larger
calls, a named backend, recording and fastattn.verify's checks capture the core."""
import copy

import pytest
import torch

import fastattn
from fastattn import constants, swap_attention
from fastattn.swap import capture
from fastattn.swap.forward import STATE, always_capture, direct_is_faster
from swap_corpus import CORPUS


@pytest.fixture
def captures(monkeypatch):
    """How many calls ran under the capture mode."""
    entered = []
    real = capture.AttentionCapture.__enter__

    def counting(self):
        if self.cores is not None:  # run time, not the swap-time analysis
            entered.append(self)
        return real(self)

    monkeypatch.setattr(capture.AttentionCapture, "__enter__", counting)
    return entered


def _layer(name="param_sn_avgpool", channels=16, **swap_kwargs):
    build, _, _ = CORPUS[name]
    torch.manual_seed(0)
    original = type(build())(channels)
    with torch.no_grad():
        for param in original.parameters():
            if param.numel() == 1:
                param.fill_(0.6)
    swapped = copy.deepcopy(original)
    handle = swap_attention(swapped, **swap_kwargs)
    assert handle.swapped and handle.swapped[0].family == "traced", handle.summary()
    return original, swapped, handle


def test_a_small_call_runs_the_forward_as_written_after_its_first_call(captures):
    original, swapped, _ = _layer()
    captures.clear()  # the probe at swap time
    original.eval(), swapped.eval()  # no spectral-norm power iteration between the calls
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        first = swapped(x)
        assert len(captures) == 1  # the first call of a signature captures and measures the core
        again = [swapped(x) for _ in range(3)]
        assert len(captures) == 1
        want = original(x)
    torch.testing.assert_close(first, want)
    for out in again:
        assert torch.equal(out, want)  # the very forward the user wrote
    [decision] = swapped.__dict__[STATE].direct.values()
    assert decision is True


def test_a_new_signature_is_decided_again_and_a_large_core_stays_captured(captures, monkeypatch):
    _, swapped, _ = _layer()
    captures.clear()
    with torch.no_grad():
        swapped(torch.randn(2, 16, 8, 8))
        swapped(torch.randn(2, 16, 8, 8))
        assert len(captures) == 1
        swapped(torch.randn(3, 16, 8, 8))  # another batch: another signature
        assert len(captures) == 2
        # a core above the budget: every call through fastattn
        monkeypatch.setattr(constants, "SWAP_DIRECT_MAX_BYTES", 0)
        monkeypatch.setattr(constants, "SWAP_DIRECT_MAX_BYTES_GRAD", 0)
        for _ in range(3):
            swapped(torch.randn(4, 16, 8, 8))
        assert len(captures) == 5


def test_training_calls_are_keyed_apart_from_inference_and_match_the_original(captures):
    original, swapped, _ = _layer()
    captures.clear()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        swapped.eval()(x)
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_s, out_o = swapped.train()(xs), original.train()(xo)
    assert len(captures) == 2  # grad mode and training are part of the signature
    out_s.sum().backward()
    out_o.sum().backward()
    torch.testing.assert_close(xs.grad, xo.grad)


def test_a_named_backend_recording_and_always_capture_keep_the_core_on_fastattn(captures):
    _, named, _ = _layer(backend="torch")
    captures.clear()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        for _ in range(3):
            named(x)
    assert len(captures) == 3  # the user asked for a backend: it runs, at every size

    _, swapped, handle = _layer()
    captures.clear()
    with torch.no_grad():
        swapped(x)
        swapped(x)
        assert len(captures) == 1
        with handle.recording() as maps:
            swapped(x)
        assert len(captures) == 2 and len(maps) == 1  # maps need the captured core
        with always_capture():
            swapped(x)
        assert len(captures) == 3


def test_verify_checks_fastattns_core_even_on_a_small_example_input(captures):
    original, _, _ = _layer()
    captures.clear()
    report = fastattn.verify(original, torch.randn(2, 16, 8, 8), dtypes=("float32",), timing=False)
    assert report.ok, str(report)
    assert len(captures) >= 4  # the swapped model's eval and train runs all captured


@pytest.mark.parametrize("shapes, backend, want", [
    ([(2, 64, 16, torch.float32, "cpu")], None, True),
    ([(2, 64, 16, torch.float32, "cuda")], None, False),  # GPU: the Triton kernel, not measured here
    ([(2, 64, 16, torch.float32, "cpu")], "torch", False),
    ([], None, False),
])
def test_direct_is_faster_rule(shapes, backend, want):
    assert direct_is_faster(shapes, backend) is want


def test_direct_rule_follows_the_budget_and_the_accumulation_dtype(monkeypatch):
    monkeypatch.setattr(constants, "SWAP_DIRECT_MAX_BYTES", 2 * 64 * 16 * 4)
    monkeypatch.setattr(constants, "SWAP_DIRECT_MAX_BYTES_GRAD", 2 * 64 * 8 * 4)
    assert not direct_is_faster([(2, 64, 16, torch.float32, "cpu")], None, grad=True)
    assert direct_is_faster([(2, 64, 8, torch.float32, "cpu")], None, grad=True)
    assert direct_is_faster([(2, 64, 16, torch.float32, "cpu")], None)
    assert direct_is_faster([(2, 64, 16, torch.bfloat16, "cpu")], None)  # accumulated in fp32: 4 bytes
    assert not direct_is_faster([(2, 64, 16, torch.float64, "cpu")], None)
    assert not direct_is_faster([(2, 64, 17, torch.float32, "cpu")], None)
    big = [(8, 1024, 1024, torch.float32, "cpu")]  # 32 MiB
    assert direct_is_faster(big, None, map_made=True)  # the map is materialised anyway
    assert not direct_is_faster(big, None, grad=True, map_made=True)  # fastattn's backward pays
    assert not direct_is_faster(big, "torch", map_made=True)
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    assert not direct_is_faster([(2, 64, 16, torch.float32, "cpu")], None)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_corpus_layer_gives_the_originals_output_captured_and_then_as_written(name, captures):
    build, shape, _ = CORPUS[name]
    layer, original = build().double().eval(), build().double().eval()  # same seed
    with torch.no_grad():
        for module in (layer, original):
            for param in module.parameters(recurse=False):
                if param.numel() == 1:
                    param.fill_(0.6)
    handle = swap_attention(layer)
    assert len(handle.swapped) == 1, handle.summary()
    traced = handle.swapped[0].family == "traced"
    captures.clear()
    torch.manual_seed(1)
    x = torch.randn(2, *shape, dtype=torch.float64)
    extra = (torch.randn(2, shape[0], dtype=torch.float64),) if name.startswith("biggan_y") else ()
    # the original rounds its map to fp32 (`.float().softmax().type(dtype)`): fastattn's core keeps fp64
    tol = dict(rtol=1e-5, atol=1e-6) if name == "float_softmax_heads_in_batch" else dict(rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        for call in range(3):  # both every time: a hand-written spectral norm updates u on each call
            got = torch.utils._pytree.tree_leaves(layer(x, *extra))
            want = torch.utils._pytree.tree_leaves(original(x, *extra))
            for a, b in zip(got, want):
                b = b.materialize() if isinstance(b, fastattn.AttentionMap) else b
                a = a.materialize() if isinstance(a, fastattn.AttentionMap) else a
                torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name} call {call}: {m}")
    # traced layers: the first call captured, the two after it ran as written (small core)
    assert len(captures) == (1 if traced else 0)


@pytest.mark.parametrize("name", ["returns_map_at", "multihead_pooled_returns_map"])  # the map, its head mean
def test_a_layer_that_makes_its_map_real_runs_as_written_without_a_graph_at_any_size(name, captures, monkeypatch):
    monkeypatch.setattr(constants, "SWAP_DIRECT_MAX_BYTES", 0)  # every core "large"
    monkeypatch.setattr(constants, "SWAP_DIRECT_MAX_BYTES_GRAD", 0)
    channels = CORPUS[name][1][0]
    original, swapped, _ = _layer(name, channels)
    original.eval(), swapped.eval()
    captures.clear()
    x = torch.randn(2, channels, 6, 8)
    with torch.no_grad():
        for _ in range(3):
            out, amap = swapped(x)
        want_out, want_map = original(x)
    assert len(captures) == 1 and torch.equal(out, want_out) and torch.equal(amap, want_map)
    xs = x.clone().requires_grad_()
    for _ in range(2):
        swapped(xs)[0].sum().backward()
    assert len(captures) == 3  # with a graph, a large core stays on fastattn
