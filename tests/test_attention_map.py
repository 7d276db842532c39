"""attention_rows and AttentionMap: exact rows and the lazy map behind full-tensor indexing."""
import itertools

import numpy as np
import pytest
import torch

import fastattn
from fastattn import AttentionMap, attention_rows
from fastattn.reference import reference_attention_map
from fastattn.testing import assert_close


def _qk(batch=2, d_qk=3, n=20, m=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, d_qk, n, generator=g, dtype=dtype) * 2,
            torch.randn(batch, d_qk, m, generator=g, dtype=dtype) * 2)


@pytest.mark.parametrize("index", [7, -1, [0, 19, 3], slice(2, 9, 3), torch.tensor([5, 5])],
                         ids=["int", "negative", "list", "slice", "tensor"])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_attention_rows_equal_the_rows_of_the_full_map(index, scale):
    q, k = _qk()
    full = reference_attention_map(q, k, scale)
    got = attention_rows(q, k, index, scale=scale)
    want = full[:, index] if not isinstance(index, torch.Tensor) else full[:, index]
    assert_close(got, want, name=f"rows {index}")


def test_attention_rows_from_the_saved_lse_equal_the_softmax_rows():
    q, k = _qk(n=30, m=30)
    v = torch.randn(2, 4, 30, dtype=torch.float64)
    _, lse = fastattn.spatial_attention(q, k, v, backend="torch", return_lse=True)
    assert_close(attention_rows(q, k, [1, 29], lse=lse), reference_attention_map(q, k)[:, [1, 29]])


def test_attention_rows_of_fp16_inputs_with_large_logits_stay_finite():
    q, k = _qk(d_qk=16, dtype=torch.float16)
    q, k = q * 40, k * 40  # logits ~ 1e5: an fp16 bmm would overflow to inf
    rows = attention_rows(q, k, [0, 1])
    assert rows.dtype == torch.float16 and torch.isfinite(rows).all()
    assert_close(rows, reference_attention_map(q.double(), k.double())[:, [0, 1]], dtype=torch.float16)


def test_attention_rows_reject_bad_indices_and_shapes():
    q, k = _qk()
    with pytest.raises(IndexError, match=r"\[-20, 20\) for N=20"):
        attention_rows(q, k, 20)
    with pytest.raises(TypeError, match="query_index must be"):
        attention_rows(q, k, [0.5])
    with pytest.raises(ValueError, match=r"k must have shape \(2, 3, M\)"):
        attention_rows(q, k[:, :2], 0)
    with pytest.raises(ValueError, match=r"lse must have shape \(B, N\) = \(2, 20\)"):
        attention_rows(q, k, 0, lse=torch.zeros(2, 19))


def test_attention_map_indexing_matches_the_materialized_tensor():
    q, k = _qk()
    amap = AttentionMap(q, k)
    full = reference_attention_map(q, k)
    assert amap.shape == full.shape and amap.size(1) == 20 and amap.dim() == 3 and len(amap) == 2
    assert_close(amap.materialize(), full)
    assert_close(amap[1, 4], full[1, 4])
    assert_close(amap[-1], full[-1])
    assert_close(amap[0, 2:5, 3], full[0, 2:5, 3])
    assert_close(amap[[0, 1], [3, 8]], full[:, [3, 8]])  # outer indexing, documented
    assert_close(amap.row(0, 11), full[0, 11])
    with pytest.raises(IndexError, match="out of range for B=2"):
        amap[2, 0]


ELLIPSIS_INDICES = [(Ellipsis, 3), (0, Ellipsis), (Ellipsis,), (Ellipsis, 4, 3), (1, Ellipsis, 2),
                    (0, 5, Ellipsis), (Ellipsis, slice(1, 4)), (0, 1, 2, Ellipsis), (-1, Ellipsis, [0, 2])]


@pytest.mark.parametrize("index", ELLIPSIS_INDICES, ids=[repr(i) for i in ELLIPSIS_INDICES])
def test_attention_map_ellipsis_indexing_matches_the_materialized_tensor(index):
    q, k = _qk()
    amap = AttentionMap(q, k)
    want = amap.materialize()[index]
    got = amap[index]
    assert got.shape == want.shape, f"{index}: {tuple(got.shape)} vs {tuple(want.shape)}"
    assert_close(got, want, name=f"map[{index}]")


def test_attention_map_ellipsis_selects_a_key_column_not_a_query_row():
    q, k = _qk(n=20, m=12)
    amap = AttentionMap(q, k)
    column = amap[..., 3]
    assert column.shape == (2, 20)
    assert_close(column, reference_attention_map(q, k)[:, :, 3], name="key column 3")


@pytest.mark.parametrize("index", [None, (None,), (0, None), (Ellipsis, None)], ids=repr)
def test_attention_map_refuses_none_with_a_message_pointing_to_materialize(index):
    amap = AttentionMap(*_qk())
    with pytest.raises(TypeError, match=r"does not support None .*map\.materialize\(\)\[\.\.\.\]"):
        amap[index]


def test_attention_map_rejects_two_ellipses_and_too_many_indices_with_one():
    amap = AttentionMap(*_qk())
    with pytest.raises(IndexError, match="single ellipsis"):
        amap[..., 0, ...]
    with pytest.raises(IndexError, match="3 dimensions .* got 4 indices besides the ellipsis"):
        amap[0, 1, 2, 3, ...]


def _index_combinations():
    batch_or_query = [1, -1, slice(None), slice(0, 2), [0, 1], torch.tensor([1, 0]), Ellipsis]
    keys = [3, slice(None), slice(2, 7, 2), [5, 6], torch.tensor([1, 0]), np.array([4, 2]), Ellipsis]
    for n in (1, 2, 3):
        pools = [batch_or_query, batch_or_query, keys][:n]
        for index in itertools.product(*pools):
            array = [isinstance(i, (list, torch.Tensor)) for i in index]
            if sum(i is Ellipsis for i in index) > 1 or (n >= 2 and array[0] and array[1]):
                continue  # two ellipses: IndexError (tested above); list batch and query: outer, documented
            yield index


@pytest.mark.parametrize("index", list(_index_combinations()), ids=repr)
def test_attention_map_indexing_equals_the_materialized_tensor_or_refuses_clearly(index):
    amap = AttentionMap(*_qk())
    want = amap.materialize()[index]
    try:
        got = amap[index]
    except TypeError as error:  # never a silently different result: a clear refusal, and only
        # where torch pairs a list/tensor key index elementwise with a list/tensor batch or query
        arrays = [not isinstance(i, (int, slice, type(Ellipsis))) for i in index]
        assert len(index) == 3 and arrays[2] and (arrays[0] or arrays[1]), f"{index} refused: {error}"
        assert "map.materialize()[...]" in str(error)
        return
    assert got.shape == want.shape, f"{index}: {tuple(got.shape)} vs {tuple(want.shape)}"
    assert_close(got, want, name=f"map[{index}]")


def test_attention_map_refuses_a_list_key_index_next_to_a_list_query_index():
    amap = AttentionMap(*_qk())
    with pytest.raises(TypeError, match=r"cannot combine a list/tensor key index .* map\.materialize\(\)"):
        amap[0, [1, 2], [3, 4]]


def test_attention_map_acts_as_a_tensor_in_torch_functions_and_methods():
    q, k = _qk()
    amap, full = AttentionMap(q, k), reference_attention_map(q, k)
    assert_close(torch.sum(amap, dim=-1), torch.ones(2, 20, dtype=torch.float64))
    assert_close(amap.cpu(), full)
    assert_close(amap.mean(), full.mean())
    assert_close(amap * 2 - 1, full * 2 - 1)
    assert_close(torch.as_tensor(np.asarray(amap)), full)
    assert_close(torch.stack(list(amap)), full)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        amap.nonsense


def test_self_attention2d_attention_map_rows_match_the_naive_map():
    layer = fastattn.SelfAttention2d(16, pool=True, backend="torch").double()
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    amap = layer.attention_map(x)
    q = layer.theta(x).flatten(2)
    k = torch.nn.functional.max_pool2d(layer.phi(x), 2).flatten(2)
    assert amap.query_hw == (6, 5) and amap.key_hw == (3, 2)
    assert_close(amap[1, 17], reference_attention_map(q, k)[1, 17])
