"""Getting the original layers back: unswap on any model and its copies, the native layer's double
swap, TorchScript refused with what to do instead, and recording() confined to its own thread."""
import copy
import io
import threading

import pytest
import torch
from torch import nn

import fastattn
from fastattn import swap_attention, unswap
from fastattn.swap import is_swapped
from gan_families import SmallGenerator, Attention, residual_scalars_nonzero, set_residual_scalar
from swap_corpus import GroupNormAttnBlock


def _model():
    """Every kind of swap in one model: two families (gen.attn1, gen.attn2), a layer captured by
    computation (block) and fastattn's own layer switched from naive (native)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"gen": SmallGenerator(), "block": GroupNormAttnBlock(16),
                           "native": fastattn.SelfAttention2d(16, attention="naive")})
    return residual_scalars_nonzero(model).eval()


SWAPPED = ["gen.attn1", "gen.attn2", "block", "native"]


def _outputs(model):
    torch.manual_seed(3)
    z, y, x = torch.randn(2, 8), torch.tensor([0, 2]), torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        return [model["gen"](z, y), model["block"](x), model["native"](x)]


def _torch_load_copy(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _layers_swapped(model) -> list[bool]:
    mods = dict(model.named_modules())
    return [is_swapped(mods[name]) for name in SWAPPED[:3]] + [mods["native"].attention == "fastattn"]


@pytest.mark.parametrize("make_copy", [copy.deepcopy, _torch_load_copy], ids=["deepcopy", "torch_save_load"])
def test_unswap_reverts_copies_that_handle_revert_leaves_swapped(make_copy):
    model = _model()
    want = _outputs(model)
    keys = list(model.state_dict())
    handle = swap_attention(model, backend="torch", strict=True)
    assert sorted(s.name for s in handle.swapped) == sorted(SWAPPED)
    twin = make_copy(model)  # an EMA generator, a checkpoint loaded back
    assert sorted(handle.revert()) == sorted(SWAPPED) and not any(_layers_swapped(model))
    assert all(_layers_swapped(twin))  # the handle only knows the layers it swapped
    assert unswap(twin) == SWAPPED
    assert not any(_layers_swapped(twin)) and twin["native"].attention == "naive"
    assert list(twin.state_dict()) == keys
    assert not [n for n, m in twin.named_modules() if {"forward", "__prepare_scriptable__"} & set(vars(m))]
    for got, expected in zip(_outputs(twin), want):
        assert torch.equal(got, expected)
    assert unswap(twin) == []


def test_unswap_reaches_the_module_inside_data_parallel_so_replicas_are_original():
    layer = set_residual_scalar(Attention(16))
    swap_attention(layer, backend="torch")
    wrapped = nn.DataParallel(copy.deepcopy(layer), device_ids=[])
    assert unswap(wrapped) == ["module"] and not is_swapped(wrapped.module)
    assert not is_swapped(wrapped.module._replicate_for_data_parallel())
    assert unswap(layer) == [""] and not is_swapped(layer)


def test_unswap_on_a_model_with_nothing_swapped_returns_an_empty_list():
    model = _model()
    fused = fastattn.SelfAttention2d(16)  # fastattn mode by construction, never swapped
    assert unswap(model) == [] and unswap(fused) == [] and fused.attention == "fastattn"
    assert fastattn.swap.unswap is unswap
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        unswap("model")


def test_native_layer_swapped_twice_ends_as_the_original_when_reverted_in_either_order():
    for order in ("swap_order", "reverse_order"):
        layer = fastattn.SelfAttention2d(16, attention="naive")
        model = nn.Sequential(layer)
        first = swap_attention(model, backend="torch")
        second = swap_attention(model, backend=None)  # explicit backend: a second, different swap
        assert (layer.attention, layer.backend) == ("fastattn", None)
        if order == "swap_order":  # the first revert restores the original; the second has no work
            assert first.revert() == ["0"] and (layer.attention, layer.backend) == ("naive", None), order
            assert second.revert() == [], order
        else:  # each revert undoes its own swap
            assert second.revert() == ["0"] and (layer.attention, layer.backend) == ("fastattn", "torch")
            assert first.revert() == ["0"], order
        assert (layer.attention, layer.backend) == ("naive", None), order
        assert unswap(model) == [], order
        assert list(layer.state_dict()) == list(fastattn.SelfAttention2d(16).state_dict())


def _swapped_in_a_model():
    model = nn.Sequential(nn.Identity(), set_residual_scalar(Attention(16))).eval()  # SN fixed
    swap_attention(model, backend="torch", strict=True)
    return model


JIT_MESSAGE = (r"{} cannot take the attention layer '1' \(Attention\).*use torch\.compile\(model\)"
               r".*call fastattn\.unswap\(model\) first")


def test_torch_jit_script_of_a_swapped_model_says_to_use_torch_compile_or_unswap():
    model = _swapped_in_a_model()
    with pytest.raises(TypeError, match=JIT_MESSAGE.format(r"torch\.jit\.script")):
        torch.jit.script(model)


def test_torch_jit_trace_of_a_swapped_model_says_to_use_torch_compile_or_unswap():
    model = _swapped_in_a_model()
    x = torch.randn(1, 16, 4, 4)
    with pytest.raises(TypeError, match=JIT_MESSAGE.format(r"torch\.jit\.trace")):
        torch.jit.trace(model, x)
    assert unswap(model) == ["1"]
    traced = torch.jit.trace(model, x)  # the advice works: the original layer traces
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_recording_collects_only_the_calls_of_the_thread_that_opened_it():
    torch.manual_seed(0)
    model = nn.ModuleDict({"gen": residual_scalars_nonzero(SmallGenerator()), "block": GroupNormAttnBlock(16)})
    handle = swap_attention(model, backend="torch", strict=True)
    z, y, x = torch.randn(2, 8), torch.tensor([0, 2]), torch.randn(2, 16, 4, 4)
    opened = threading.Barrier(2)
    other: dict = {}

    def other_thread():  # another user of the same model, recording its own calls
        with torch.no_grad(), handle.recording() as maps:
            opened.wait()
            for _ in range(3):
                model["gen"](z, y), model["block"](x)
            other.update(maps)
        with torch.no_grad():
            model["gen"](z, y)  # after its own recording ended, while the main thread records

    thread = threading.Thread(target=other_thread)
    thread.start()
    with torch.no_grad(), handle.recording() as maps:
        opened.wait()
        model["gen"](z, y), model["block"](x)
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert {name: len(found) for name, found in maps.items()} == {"gen.attn1": 1, "gen.attn2": 1, "block": 1}
    assert {name: len(found) for name, found in other.items()} == {"gen.attn1": 3, "gen.attn2": 3, "block": 3}
    assert all(state.recorder is None for _, state in handle._states)
