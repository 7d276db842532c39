"""Attention maps for people: exact rows for chosen query pixels, a lazy (B, N, M) map, a PNG.

The fused layers never build the (B, N, M) attention matrix. A row of it, for query pixel i of
image b, is softmax_j(scale * q[b, :, i] . k[b, :, j]); it costs O(d_qk * M) to recompute from
q and k, and with the saved log-sum-exp it is exactly exp(logit - lse) with the normalisation the
kernel used. `attention_rows` does that for chosen pixels, `AttentionMap` wraps it behind the
indexing of the full tensor (what heykeetae's layer returns); fastattn.viz draws them.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .reference import accumulation_dtype

__all__ = ["AttentionMap", "attention_rows"]


def _query_indices(query_index, n_queries: int, device) -> tuple[Tensor, bool]:
    """(1-D LongTensor of query pixels, whether a single int was given)."""
    if isinstance(query_index, Tensor) and query_index.dim() == 0:
        query_index = int(query_index)
    if isinstance(query_index, numbers.Integral) and not isinstance(query_index, bool):
        index, single = torch.tensor([int(query_index)]), True
    elif isinstance(query_index, slice):
        index, single = torch.arange(n_queries)[query_index], False
    else:
        try:
            index = torch.as_tensor(query_index)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"query_index must be an int, a slice, a sequence of ints or a 1-D integer "
                            f"tensor, got {type(query_index).__name__}") from error
        if index.dim() != 1 or index.dtype == torch.bool or (index.numel() and index.is_floating_point()):
            raise TypeError(f"query_index must be an int, a slice, a sequence of ints or a 1-D integer "
                            f"tensor, got {query_index!r}")
        index, single = index.long(), False
    if index.numel() and (int(index.min()) < -n_queries or int(index.max()) >= n_queries):
        raise IndexError(f"query_index must lie in [-{n_queries}, {n_queries}) for N={n_queries} query "
                         f"pixels, got {query_index!r}")
    return index.remainder(max(n_queries, 1)).to(device), single


def _rows(q: Tensor, k: Tensor, index: Tensor, scale: float, lse: Tensor | None) -> Tensor:
    """(B, n, M) probabilities for query pixels `index`, in q's dtype, computed in >= fp32."""
    acc = accumulation_dtype(q.dtype)
    q_sel = q.index_select(2, index).to(acc)  # (B, d_qk, n)
    logits = torch.bmm(q_sel.transpose(1, 2), k.to(acc))
    if scale != 1.0:
        logits = logits * scale
    if lse is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = torch.exp(logits - lse.index_select(1, index).to(acc).unsqueeze(-1))
    return probs.to(q.dtype)


def _check_qk(q, k, lse=None) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D tensor ({'(B, d_qk, N)' if name == 'q' else '(B, d_qk, M)'}), got {got}")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1]:
        raise ValueError(f"k must have shape ({q.shape[0]}, {q.shape[1]}, M) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if lse is not None and (not isinstance(lse, Tensor) or tuple(lse.shape) != (q.shape[0], q.shape[2])):
        got = tuple(lse.shape) if isinstance(lse, Tensor) else type(lse).__name__
        raise ValueError(f"lse must have shape (B, N) = {(q.shape[0], q.shape[2])}, got {got}")


def attention_rows(q: Tensor, k: Tensor, query_index, *, scale: float = 1.0,
                   lse: Tensor | None = None) -> Tensor:
    """Exact attention rows softmax_j(scale * q[b, :, i] . k[b, :, j]) for chosen query pixels.

    q: (B, d_qk, N), k: (B, d_qk, M) (the layer's conv outputs, flattened); query_index: an int
    (returns (B, M)), or a slice / sequence / 1-D tensor of flat pixel indices i = row * W + col
    (returns (B, n, M)). Costs O(B * n * M * d_qk): the (B, N, M) matrix is never built.
    lse: optional (B, N) log-sum-exp saved by `spatial_attention(..., return_lse=True)`; with it
    the rows are exp(logit - lse), normalised exactly as the forward pass was.
    """
    _check_qk(q, k, lse)
    index, single = _query_indices(query_index, q.shape[2], q.device)
    rows = _rows(q, k, index, float(scale), lse)
    return rows[:, 0] if single else rows


def _is_array_index(index) -> bool:
    """A list / tuple / tensor index with at least one dimension (torch's advanced indexing)."""
    return isinstance(index, (list, tuple)) or (isinstance(index, Tensor) and index.dim() > 0) or (
        type(index).__module__ == "numpy" and getattr(index, "ndim", 0) > 0)


class AttentionMap:
    """The (B, N, M) attention matrix of one layer call, computed only where it is looked at.

    `map[b, i]` is the exact row (length M) of query pixel i in image b; `map[b]`, `map[b, i0:i1]`,
    `map[b, [i, ...]]` give several rows; a third index selects keys; `...` stands for the
    dimensions not indexed (`map[..., j]` is key column j of every row); None (a new axis) is
    refused: use map.materialize()[...], as for a list/tensor key index next to a list/tensor
    batch or query index (torch pairs those elementwise). Batch and query indices
    combine as an outer product (map[[0, 1], [5, 7]] is (2, 2, M)). `materialize()` builds the
    full tensor; torch functions and tensor methods applied to the map materialize it first.
    It holds q, k and the lse (tensors the layer saved for backward anyway), nothing N x M.
    """

    def __init__(self, q: Tensor, k: Tensor, lse: Tensor | None = None, *, scale: float = 1.0,
                 query_hw: tuple[int, int] | None = None, key_hw: tuple[int, int] | None = None):
        _check_qk(q, k, lse)
        self.q, self.k, self.lse, self.scale = q, k, lse, float(scale)
        self.query_hw, self.key_hw = query_hw, key_hw

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.q.shape[0], self.q.shape[2], self.k.shape[2]))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 3

    ndim = property(dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def __len__(self) -> int:
        return self.q.shape[0]

    def __repr__(self) -> str:
        return (f"AttentionMap(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"query_hw={self.query_hw}, key_hw={self.key_hw})")

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if any(part is None for part in key):
            raise TypeError(f"AttentionMap indexing does not support None (a new axis), got index {key!r}: "
                            "index the full tensor instead, map.materialize()[...]")
        ellipses = [i for i, part in enumerate(key) if part is Ellipsis]
        if len(ellipses) > 1:
            raise IndexError(f"an index can only have a single ellipsis ('...'), got {key!r}")
        if ellipses:  # '...' stands for as many full slices as the 3 dimensions leave over
            at = ellipses[0]
            fill = 3 - (len(key) - 1)
            if fill < 0:
                raise IndexError(f"AttentionMap has 3 dimensions (B, N, M), got {len(key) - 1} indices "
                                 f"besides the ellipsis in {key!r}")
            key = key[:at] + (slice(None),) * fill + key[at + 1:]
        if len(key) > 3:
            raise IndexError(f"AttentionMap has 3 dimensions (B, N, M), got {len(key)} indices")
        if len(key) == 3 and _is_array_index(key[2]) and (_is_array_index(key[0]) or _is_array_index(key[1])):
            raise TypeError(f"AttentionMap cannot combine a list/tensor key index with a list/tensor batch or "
                            f"query index (torch would pair them elementwise), got index {key!r}: index the "
                            "full tensor instead, map.materialize()[...]")
        batch = key[0]
        if isinstance(batch, Tensor) and batch.dim() == 0:
            batch = int(batch)
        single_batch = isinstance(batch, numbers.Integral) and not isinstance(batch, bool)
        if single_batch:
            n_batch = self.q.shape[0]
            if not -n_batch <= batch < n_batch:
                raise IndexError(f"batch index {batch} is out of range for B={n_batch}")
            batch = slice(batch % n_batch, batch % n_batch + 1)
        q, k = self.q[batch], self.k[batch]
        lse = None if self.lse is None else self.lse[batch]
        index, single_query = _query_indices(key[1] if len(key) > 1 else slice(None), q.shape[2], q.device)
        rows = _rows(q, k, index, self.scale, lse)
        if single_query:
            rows = rows[:, 0]
        if single_batch:
            rows = rows[0]
        if len(key) == 3:
            rows = rows[..., key[2]]
        return rows

    def row(self, b: int, i: int) -> Tensor:
        """The attention row (length M) of query pixel i of image b."""
        return self[b, i]

    def materialize(self) -> Tensor:
        """The full (B, N, M) tensor, as the original layer returned it."""
        return self[:, :]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def unwrap(a):
            if isinstance(a, AttentionMap):
                return a.materialize()
            if isinstance(a, (list, tuple)):
                return type(a)(unwrap(x) for x in a)
            return a

        return func(*unwrap(args), **{name: unwrap(a) for name, a in (kwargs or {}).items()})

    def __iter__(self):
        return (self[b] for b in range(len(self)))

    def __array__(self, dtype=None, copy=None):
        array = self.materialize().detach().cpu().numpy()
        return array if dtype is None else array.astype(dtype)

    def __getattr__(self, name):
        # Tensor methods (map.cpu(), map.mean(), map.numpy() ...) act on the materialized map.
        if name.startswith("_") or name in ("q", "k", "lse", "scale", "query_hw", "key_hw"):
            raise AttributeError(name)
        if not hasattr(Tensor, name):
            raise AttributeError(f"'AttentionMap' object has no attribute {name!r}")
        return getattr(self.materialize(), name)


def _materializing(op: str):
    def method(self, *args):
        return getattr(self.materialize(), op)(*args)

    method.__name__ = op
    return method


for _op in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow", "neg",
            "matmul", "rmatmul", "lt", "le", "gt", "ge"):
    setattr(AttentionMap, f"__{_op}__", _materializing(f"__{_op}__"))
