"""Capture by computation on the corpus (tests/swap/swap_corpus.py): every layer is swapped and, in fp64,
its outputs, input and parameter gradients, spectral-norm state after a training step, state_dict
and revert equal the unswapped original's; the look-alikes are refused with their reasons."""
import re
import warnings

import pytest
import torch
from torch import nn

import fastattn.nn
import fastattn.swap.forward
from fastattn import swap_attention
from fastattn.swap import is_swapped
from fastattn.testing import assert_close
from swap_corpus import CORPUS, REFUSED

#: corpus layers that a name-based family takes first (their stateful SN used to defeat the probe)
FAST_PATH = {"rosinality_custom_sn": "rosinality", "custom_sn_studio_pooled": "studiogan"}

#: the original rounds its map to fp32 (`.float().softmax().type(dtype)`): fastattn keeps fp64
ROUNDS_MAP_TO_FP32 = {"float_softmax_heads_in_batch"}


def _nonzero_scalars(module, value=0.6):
    with torch.no_grad():
        for param in module.parameters(recurse=False):
            if param.numel() == 1:
                param.fill_(value)
    return module


def _inputs(name, shape, batch=2, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(batch, *shape, dtype=torch.float64)
    extra = (torch.randn(batch, shape[0], dtype=torch.float64),) if name.startswith("biggan_y") else ()
    return x, extra


def _loss(out, seed=2):
    torch.manual_seed(seed)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return sum((t * torch.randn_like(t)).sum() for t in leaves)


def _close(a, b, name, loose):
    if not a.is_floating_point():
        assert torch.equal(a, b), name
    elif loose:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        assert_close(a, b, name=name)


@pytest.fixture
def count_cores(monkeypatch):
    calls = []
    real = fastattn.nn.attention_core

    def counting(q, k, v, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fastattn.nn, "attention_core", counting)
    monkeypatch.setattr(fastattn.swap.forward, "attention_core", counting)  # the families' path
    return calls


def test_corpus_covers_every_point_of_the_issue_list():
    points = {p for _, _, covered in CORPUS.values() for p in covered}
    assert points == set(range(1, 11)) and len(CORPUS) >= 20


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_layer_is_swapped_and_matches_the_original_in_fp64(name, count_cores):
    build, shape, _ = CORPUS[name]
    layer = _nonzero_scalars(build().double())
    original = _nonzero_scalars(build().double())  # same seed; a hand-written SN defies deepcopy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = swap_attention(layer, backend="torch", strict=True)
    assert len(handle.swapped) == 1, handle.summary()  # by capture, or by a family (fast path)
    assert handle.swapped[0].family == FAST_PATH.get(name, "traced"), handle.summary()
    record = handle.swapped[0]
    assert record.pattern and record.max_error is not None and record.max_error < 1e-6
    loose = name in ROUNDS_MAP_TO_FP32

    x, extra = _inputs(name, shape)
    x_swap, x_orig = x.clone().requires_grad_(), x.clone().requires_grad_()
    count_cores.clear()
    out_swap = layer.train()(x_swap, *extra)
    assert count_cores, "the swapped forward did not run the core through fastattn"
    out_orig = original.train()(x_orig, *extra)
    for i, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(out_swap),
                                   torch.utils._pytree.tree_leaves(out_orig))):
        _close(a, b, f"{name} training output {i}", loose)
    _loss(out_swap).backward()
    _loss(out_orig).backward()
    _close(x_swap.grad, x_orig.grad, f"{name} input gradient", loose)
    ref_params = dict(original.named_parameters())
    for pname, param in layer.named_parameters():
        _close(param.grad, ref_params[pname].grad, f"{name} gradient of {pname}", loose)
    ref_state = original.state_dict()
    assert layer.state_dict().keys() == ref_state.keys()
    for key, value in layer.state_dict().items():  # SN u / BN running stats after the step
        _close(value, ref_state[key], f"{name} state {key}", loose)

    layer.eval(), original.eval()
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(layer(x, *extra)),
                                       torch.utils._pytree.tree_leaves(original(x, *extra)))):
            _close(a, b, f"{name} eval output {i}", loose)
        assert handle.revert() == [""] and not is_swapped(layer)
        for a, b in zip(torch.utils._pytree.tree_leaves(layer(x, *extra)),
                        torch.utils._pytree.tree_leaves(original(x, *extra))):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_look_alike_is_refused_with_its_reason(name):
    build, _, reason = REFUSED[name]
    layer = build().double()
    before = dict(vars(layer))
    with pytest.warns(UserWarning, match="not swapped"):
        handle = swap_attention(layer, backend="torch")
    assert handle.swapped == [] and not is_swapped(layer) and vars(layer).keys() == before.keys()
    why = str(handle.skipped[0])
    assert re.search(reason, why), why


def test_swapped_multi_head_layer_holds_no_n_by_m_tensor(count_cores):
    build, (c, _, _), _ = CORPUS["multihead_qkv_einsum_h32"]
    layer = build()
    swap_attention(layer, backend="torch")
    x = torch.randn(1, c, 64, 64)  # N = M = 4096: the (2, 4096, 4096) map would be 128 MiB
    seen = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() >= 2 * 4096 * 4096:
                    seen.append((getattr(func, "__name__", func), tuple(t.shape), t.stride()))
            return out

    count_cores.clear()
    with torch.no_grad(), Watch():
        layer(x)
    assert all(0 in stride for _, _, stride in seen), seen  # only zero-strided placeholders
    assert count_cores == [((2, 32, 4096), (2, 32, 4096), (2, 32, 4096))]
