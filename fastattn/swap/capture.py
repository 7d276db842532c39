"""Capture by computation: find softmax(scale * q^T k) v in a layer's forward and run only that core
through fastattn, while everything else runs as the user's code runs it.

Why a torch-function-level trace (a `TorchFunctionMode`), not torch.fx, make_fx or torch.export:
- `torch.fx.symbolic_trace` fails on the Python arithmetic on shapes real layers do
  (`int(c) ** -0.5`, `b, c, h, w = x.shape`, `len(x.shape)`): it traces with proxies, not values.
- make_fx and torch.export trace with real tensors, but below autograd, at the aten level, and they
  inline the submodules and their hooks. An aten graph cannot be swapped back into the user's
  forward: running it instead would run the spectral norms' hooks as graph ops, not as the modules
  run them (a hand-written SN that updates `u` on every call must keep doing exactly that).
- A `TorchFunctionMode` sees every torch call the user's forward makes (functions, Tensor methods,
  operators, property reads), with real tensors and real shapes, above autograd. The same mode finds
  the core at swap time (on a probe input) and replaces it at run time, so what is found is what is
  replaced. At run time the user's own forward runs under the mode: submodules are called as
  modules (hooks, parametrizations and custom spectral norms fire once per call as before), norms,
  pooling and residuals run as written; only the core is intercepted. Dynamo traces such a mode,
  so a layer that compiles fullgraph still does.

How the core is replaced without the N x M logits: the contraction of q and k returns a
placeholder (a zero-strided expanded tensor, no N x M memory) that remembers q, k and the layout;
a constant scale, softmax, transposes, permutes, views that regroup batch dims and dtype casts
update it; the contraction with v computes `spatial_attention(q, k, v, scale=...)` (heads and
other batch dims folded into the batch, layouts mapped by permutes/reshapes that copy only where
strides force it). Any other use of a placeholder (a dropout on the map, a bias added to the
logits, a mask) computes the real tensor exactly ("materialises" it): the result stays exact, and
at swap time such a layer is refused with the op named. A map that the forward returns is
materialised on return, so return types are unchanged. `F.scaled_dot_product_attention` without a
mask, dropout or causal flag is replaced directly.

Which contraction is the core is found once, at swap time, per training mode: its position among
the contraction / SDPA calls the forward makes (`Plan`). At run time only that call is
intercepted; if what sits there is no longer a q.k contraction, the original op runs (exact) and a
warning says so.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .torch_calls import (CAST, CONTRACT, DIV, META_METHODS, META_PROPS, MUL, PERMUTE, SDPA, SOFTMAX, VIEW, WHAT,
                          call_arguments, constant_scalar, contraction_operands, contraction_roles, fold, func_name,
                          int_dim, property_name, result_dtype)

__all__ = ["AttentionCapture", "Plan", "analyse", "materialise_outputs"]

@dataclass
class _Lazy:
    """What a placeholder stands for: scale * q^T k (softmaxed over `key` if set), laid out as
    `axes` (batch index, "n" for q's pixels, "m" for k's), batch dims `batch` (row-major, folded
    into q's and k's dim 0)."""

    root: int
    q: Tensor  # (B', d, N)
    k: Tensor  # (B', d, M)
    batch: tuple
    axes: tuple
    dtype: torch.dtype
    scale: float = 1.0
    key: str | None = None
    softmax_dim: int | None = None
    narrowest: torch.dtype | None = None  # a cast on the way rounded the map to this dtype
    value: Tensor | None = None  # materialised, cached

    def shape(self) -> tuple:
        sizes = {"n": self.q.shape[2], "m": self.k.shape[2]}
        return tuple(self.batch[a] if isinstance(a, int) else sizes[a] for a in self.axes)

    def copy(self, **changes) -> "_Lazy":
        fields = dict(root=self.root, q=self.q, k=self.k, batch=self.batch, axes=self.axes,
                      dtype=self.dtype, scale=self.scale, key=self.key, softmax_dim=self.softmax_dim,
                      narrowest=self.narrowest)
        fields.update(changes)
        return _Lazy(**fields)


def _placeholder(lazy: _Lazy) -> Tensor:
    return torch.zeros((), dtype=lazy.dtype, device=lazy.q.device).expand(lazy.shape())


def _materialise(lazy: _Lazy) -> Tensor:
    if lazy.value is None:
        logits = torch.bmm(lazy.q.transpose(1, 2), lazy.k)
        if lazy.scale != 1.0:
            logits = logits * lazy.scale
        if lazy.key is not None:
            logits = torch.softmax(logits, dim=-1 if lazy.key == "m" else 1)
        logits = logits.to(lazy.dtype).reshape(*lazy.batch, *logits.shape[1:])
        base = [*range(len(lazy.batch)), "n", "m"]
        lazy.value = logits.permute([base.index(a) for a in lazy.axes])
    return lazy.value


@dataclass
class Core:
    """One attention core found at swap time (for the pattern line)."""

    index: int
    op: str
    d_qk: int
    d_v: int
    n_queries: int
    n_keys: int
    scale: float
    softmax_dim: int | None
    roles_swapped: bool
    folded_batch: int


@dataclass
class Plan:
    """Where the cores are: their positions among the contraction / SDPA calls, per training mode."""

    cores: dict = field(default_factory=dict)  # training (bool) -> tuple of call indices
    pattern: str = ""


class AttentionCapture(TorchFunctionMode):
    """Runs a forward with its attention core(s) intercepted.

    cores: the call positions to intercept (None: every q.k contraction, for the swap-time
    analysis). After the run: `hits` (cores computed by fastattn), `materialised` (the ops that
    needed a placeholder's real value), `found` (completed cores), `reasons` (why chains broke)."""

    def __init__(self, cores=None, backend: str | None = None, recorder: list | None = None):
        super().__init__()
        self.cores, self.backend, self.recorder = cores, backend, recorder
        self.calls = 0
        self.lazy: list = []  # (placeholder, _Lazy)
        self.tainted: list = []  # (tensor, root, stage, op) - analysis only
        self.hits = 0
        self.found: list[Core] = []
        self.materialised: list[str] = []
        self.reasons: list[str] = []
        self.misses: list[int] = []
        self.softmax_seen = False
        self.core_shapes: list[tuple] = []  # (B', N, M, dtype, device type) of each core computed
        self.narrowest: torch.dtype | None = None  # lowest float precision the core passes through

    # -- bookkeeping ----------------------------------------------------------------------------
    def _lazy_of(self, value):
        if isinstance(value, Tensor):
            for tensor, lazy in self.lazy:
                if tensor is value:
                    return lazy
        return None

    def _new(self, lazy: _Lazy, tensor: Tensor | None = None) -> Tensor:
        tensor = _placeholder(lazy) if tensor is None else tensor
        self.lazy.append((tensor, lazy))
        return tensor

    def _taint_of(self, value):
        if isinstance(value, Tensor):
            for tensor, root, stage, op in self.tainted:
                if tensor is value:
                    return root, stage, op
        return None

    # -- the dispatcher -------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.cores is not None and not self.lazy:
            # run time with no placeholder alive (every op before the core): only the core's own
            # calls need looking at, everything else runs as called. This path is what a swapped
            # layer pays per op of its forward (convs, norms, spectral-norm hooks, pooling).
            if func in CONTRACT:
                return self._contract(func, CONTRACT[func], args, kwargs, [])
            if func is SDPA:
                return self._sdpa(args, kwargs)
            return func(*args, **kwargs)
        leaves = [a for a in call_arguments(args, kwargs) if isinstance(a, Tensor)]
        lazies = [lz for lz in (self._lazy_of(a) for a in leaves) if lz is not None]
        if func in CONTRACT or func is SDPA:
            if func is SDPA:
                return self._sdpa(args, kwargs)
            return self._contract(func, CONTRACT[func], args, kwargs, lazies)
        if lazies:
            handled = self._on_lazy(func, args, kwargs, lazies[0]) if len(lazies) == 1 else None
            if handled is not None:
                return handled
            return self._run_materialised(func, args, kwargs)
        if self.cores is None and self.tainted and func in SOFTMAX:
            taint = self._taint_of(args[0] if args else kwargs.get("input"))
            if taint is not None and taint[1] == "logits":
                self.reasons.append(f"{WHAT.get(taint[2], f'{taint[2]} is applied to')} the logits "
                                    "before the softmax")
        result = func(*args, **kwargs)
        if self.cores is None and self.tainted:
            taints = [t for t in (self._taint_of(a) for a in leaves) if t is not None]
            if taints:
                for out in pytree.tree_leaves(result):
                    if isinstance(out, Tensor):
                        self.tainted.append((out, *taints[0]))
        return result

    def _run_materialised(self, func, args, kwargs):
        name = func_name(func)
        stages = []

        def real(value):
            lazy = self._lazy_of(value)
            if lazy is None:
                return value
            stages.append((lazy.root, "attention" if lazy.key else "logits"))
            return _materialise(lazy)

        args, kwargs = pytree.tree_map(real, (args, kwargs))
        self.materialised.extend((name, stage) for _, stage in stages)
        result = func(*args, **kwargs)
        if self.cores is None and stages:
            if name == "dropout" or "dropout" in name:
                self.reasons.append("dropout is applied to the attention map before the "
                                    "contraction with v")
            for out in pytree.tree_leaves(result):
                if isinstance(out, Tensor):
                    self.tainted.append((out, stages[0][0], stages[0][1], name))
        return result

    # -- ops on a placeholder -------------------------------------------------------------------
    def _on_lazy(self, func, args, kwargs, lazy: _Lazy):
        prop = property_name(func)
        if func in META_METHODS or prop in META_PROPS:
            return func(*args, **kwargs)
        src = args[0] if args else None
        if self._lazy_of(src) is not lazy:  # the placeholder is not the subject
            if func in MUL and len(args) == 2 and self._lazy_of(args[1]) is lazy and lazy.key is None:
                factor = constant_scalar(args[0])
                if factor is not None:
                    return self._new(lazy.copy(scale=lazy.scale * factor))
            return None
        ndim = len(lazy.axes)
        if func is F.dropout:  # identity when p == 0 or in eval: nothing to fold
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            return self._new(lazy.copy()) if p == 0 or not training else None
        if func in SOFTMAX:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            dtype = kwargs.get("dtype", None)
            dim_n = int_dim(dim, ndim)
            if lazy.key is not None or dim_n is None or not isinstance(lazy.axes[dim_n], str):
                if self.cores is None and dim_n is not None and lazy.key is None:
                    self.reasons.append("the softmax runs over a batch or head axis, not over keys "
                                        "or queries")
                return None
            self.softmax_seen = True
            return self._new(lazy.copy(key=lazy.axes[dim_n], softmax_dim=dim,
                                       dtype=dtype if dtype is not None else lazy.dtype))
        if func in MUL or func in DIV:
            if lazy.key is not None or len(args) != 2 or kwargs:
                return None
            factor = constant_scalar(args[1])
            if factor is None or factor == 0.0:
                return None
            kind = MUL.get(func) or DIV.get(func)
            scale = lazy.scale * factor if kind in ("mul", "imul") else lazy.scale / factor
            if kind in ("imul", "idiv"):
                lazy.scale = scale
                return src
            return self._new(lazy.copy(scale=scale))
        if func in PERMUTE:
            if PERMUTE[func] == "permute":
                dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) \
                    else (args[1] if len(args) > 1 else kwargs.get("dims"))
            else:
                perm = list(range(ndim))
                d0, d1 = (args[1], args[2]) if len(args) == 3 else (None, None)
                d0, d1 = int_dim(d0, ndim), int_dim(d1, ndim)
                if d0 is None or d1 is None:
                    return None
                perm[d0], perm[d1] = perm[d1], perm[d0]
                dims = perm
            dims = [int_dim(d, ndim) for d in dims]
            if None in dims or sorted(dims) != list(range(ndim)):
                return None
            return self._new(lazy.copy(axes=tuple(lazy.axes[d] for d in dims)))
        if prop in ("mT", "T"):
            if prop == "T" and ndim != 2:
                return None
            perm = list(range(ndim))
            perm[-1], perm[-2] = perm[-2], perm[-1]
            return self._new(lazy.copy(axes=tuple(lazy.axes[d] for d in perm)))
        if func in VIEW:
            if VIEW[func] == "same":
                return self._new(lazy.copy()) if not kwargs else None
            if any(isinstance(a, torch.dtype) for a in args[1:]):
                return None
            shape = tuple(func(*args, **kwargs).shape)
            return self._regroup(lazy, shape)
        if func in CAST:
            dtype = CAST[func]
            if dtype is None:
                rest = [*args[1:], *kwargs.values()]
                if func is Tensor.type_as and len(args) == 2 and isinstance(args[1], Tensor):
                    dtype = args[1].dtype
                elif len(rest) == 1 and isinstance(rest[0], torch.dtype):
                    dtype = rest[0]
                else:
                    return None
            elif len(args) > 1 or kwargs:
                return None
            low = lazy.narrowest
            if dtype.is_floating_point and torch.finfo(dtype).bits < torch.finfo(low or lazy.q.dtype).bits:
                low = dtype
            return self._new(lazy.copy(dtype=dtype, narrowest=low))
        return None

    def _regroup(self, lazy: _Lazy, shape: tuple):
        k = len(lazy.batch)
        if lazy.axes[:k] != tuple(range(k)) or len(shape) < 2:
            return None
        current = lazy.shape()
        if shape[-2:] != current[-2:] or math.prod(shape[:-2]) != math.prod(lazy.batch):
            return None
        batch = tuple(shape[:-2])
        return self._new(lazy.copy(batch=batch, axes=(*range(len(batch)), *lazy.axes[k:])))

    # -- contractions -----------------------------------------------------------------------------
    def _contract(self, func, kind, args, kwargs, lazies):
        parsed = contraction_operands(kind, args, kwargs)
        index = self.calls  # every contraction counts, lazy operands or not, in both flavours
        self.calls += 1
        if lazies:
            if parsed is not None and len(lazies) == 1 and lazies[0].key is not None:
                out = self._resolve(parsed, lazies[0], func_name(func))
                if out is not None:
                    return out
            return self._run_materialised(func, args, kwargs)
        taint = None
        if self.cores is None and self.tainted and parsed is not None:
            for operand in parsed[:2]:
                taint = taint or self._taint_of(operand)
            if taint is not None and taint[1] == "attention":
                self.reasons.append(f"{WHAT.get(taint[2], f'{taint[2]} is applied to')} the "
                                    "attention map before the contraction with v")
        wanted = self.cores is None or index in self.cores
        if wanted and parsed is not None:
            lazy = self._logits(index, parsed)
            if lazy is not None:
                return self._new(lazy)
        if wanted and self.cores is not None:
            self.misses.append(index)
        return func(*args, **kwargs)

    def _logits(self, index, parsed) -> _Lazy | None:
        a, b, la, lb, lo = parsed
        roles = contraction_roles(la, lb, lo)
        if roles is None or not a.is_floating_point() or not b.is_floating_point():
            return None
        batch, contracted, a_only, b_only = roles
        if len(contracted) != 1 or len(a_only) != 1 or len(b_only) != 1:
            return None
        if any(a.shape[la.index(l)] != b.shape[lb.index(l)] for l in batch + contracted):
            return None
        q = fold(a, la, batch, contracted[0], a_only[0])
        k = fold(b, lb, batch, contracted[0], b_only[0])
        axes = tuple(batch.index(l) if l in batch else ("n" if l == a_only[0] else "m") for l in lo)
        return _Lazy(index, q, k, tuple(a.shape[la.index(l)] for l in batch), axes,
                     result_dtype(a.device, a.dtype, b.dtype))

    def _resolve(self, parsed, lazy: _Lazy, op: str):
        a, b, la, lb, lo = parsed
        lazy_is_a = self._lazy_of(a) is lazy
        lp, lv, v = (la, lb, b) if lazy_is_a else (lb, la, a)
        roles = contraction_roles(la, lb, lo)
        if roles is None or not v.is_floating_point():
            return None
        axis = dict(zip(lp, lazy.axes))
        query_axis = "n" if lazy.key == "m" else "m"
        key_label = next(l for l in lp if axis[l] == lazy.key)
        query_label = next(l for l in lp if axis[l] == query_axis)
        batch, contracted, _, _ = roles
        v_only = [l for l in lv if l not in lp]
        if contracted != [key_label] or query_label not in lo or len(v_only) != 1:
            if self.cores is None and query_label in contracted:
                self.reasons.append("the contraction with v sums over the query axis, not the "
                                    "softmax axis (the map is not transposed): not attention")
            return None
        batch_by_axis = sorted((l for l in lp if isinstance(axis[l], int)), key=lambda l: axis[l])
        if sorted(batch) != sorted(batch_by_axis):
            return None
        if any(v.shape[lv.index(l)] != lazy.batch[axis[l]] for l in batch_by_axis):
            return None
        q, k = (lazy.q, lazy.k) if lazy.key == "m" else (lazy.k, lazy.q)
        vf = fold(v, lv, batch_by_axis, v_only[0], key_label)
        if vf.shape[0] != q.shape[0] or vf.shape[2] != k.shape[2]:
            return None
        out = self._attend(q, k, vf, lazy.scale)
        if lazy.narrowest is not None:  # the user's map is rounded on the way: compare in that dtype
            self.narrowest = lazy.narrowest
        out = out.reshape(*lazy.batch, *out.shape[1:])
        have = [*batch_by_axis, v_only[0], query_label]
        out = out.permute([have.index(l) for l in lo])
        out = out.to(result_dtype(v.device, v.dtype, lazy.dtype))
        self.hits += 1
        if self.cores is None:
            self.found.append(Core(lazy.root, op, q.shape[1], vf.shape[1], q.shape[2], k.shape[2],
                                   lazy.scale, lazy.softmax_dim, lazy.key == "n", q.shape[0]))
        return out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        from ..attention_map import AttentionMap
        from ..nn import attention_core

        dtype = q.dtype
        k, v = k.to(dtype), v.to(dtype)
        self.core_shapes.append((q.shape[0], q.shape[2], k.shape[2], dtype, q.device.type))
        if self.recorder is None:
            return attention_core(q, k, v, scale=scale, backend=self.backend)
        out, lse = attention_core(q, k, v, scale=scale, backend=self.backend, return_lse=True)
        self.recorder.append(AttentionMap(q, k, lse, scale=scale))
        return out

    def _sdpa(self, args, kwargs):
        index = self.calls
        self.calls += 1
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
        problems = []
        if bound.get("attn_mask") is not None:
            problems.append("F.scaled_dot_product_attention is called with a mask (attn_mask)")
        if bound.get("dropout_p", 0.0):
            problems.append("F.scaled_dot_product_attention applies dropout to the map")
        if bound.get("is_causal", False):
            problems.append("F.scaled_dot_product_attention is called with a causal mask")
        if bound.get("enable_gqa", False):
            problems.append("F.scaled_dot_product_attention groups query heads (enable_gqa)")
        shapes_ok = (all(isinstance(t, Tensor) and t.dim() >= 2 for t in (q, k, v))
                     and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and q.shape[-1] == k.shape[-1]
                     and k.shape[-2] == v.shape[-2])
        wanted = self.cores is None or index in self.cores
        if problems or not shapes_ok or not wanted or any(self._lazy_of(t) for t in (q, k, v)):
            if self.cores is None:
                self.reasons.extend(problems)
            elif wanted:
                self.misses.append(index)
            args, kwargs = pytree.tree_map(
                lambda t: _materialise(self._lazy_of(t)) if self._lazy_of(t) is not None else t,
                (args, kwargs))
            return SDPA(*args, **kwargs)
        scale = bound.get("scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        batch = tuple(q.shape[:-2])
        qf, kf, vf = (t.reshape(-1, *t.shape[-2:]).transpose(1, 2) for t in (q, k, v))
        out = self._attend(qf, kf, vf, scale)  # (B', Ev, L)
        out = out.transpose(1, 2).reshape(*batch, q.shape[-2], v.shape[-1])
        out = out.to(result_dtype(q.device, q.dtype, k.dtype, v.dtype))
        self.hits += 1
        if self.cores is None:
            self.found.append(Core(index, "F.scaled_dot_product_attention", q.shape[-1], v.shape[-1],
                                   q.shape[-2], k.shape[-2], scale, -1, False, qf.shape[0]))
        return out

    # -- after the forward --------------------------------------------------------------------------
    def finish(self, output):
        """The forward's output with every placeholder in it materialised (a returned map)."""
        returned = []

        def real(value):
            lazy = self._lazy_of(value)
            if lazy is None:
                return value
            returned.append(lazy.root)
            return _materialise(lazy)

        output = pytree.tree_map(real, output)
        self.lazy, self.tainted = [], []
        return output, returned


def materialise_outputs(mode: AttentionCapture, output):
    return mode.finish(output)


def describe(core: Core, batch_size: int, n_pixels: int | None) -> str:
    """One line: 'q·k over 64 ch, scale 0.125, softmax dim -1, 2 heads, keys pooled 2x2'."""
    parts = [f"q·k over {core.d_qk} ch" if core.op != "F.scaled_dot_product_attention"
             else f"F.scaled_dot_product_attention over {core.d_qk} ch"]
    parts.append("unscaled" if core.scale == 1.0 else f"scale {core.scale:.4g}")
    if core.softmax_dim is not None and core.op != "F.scaled_dot_product_attention":
        parts.append(f"softmax dim {core.softmax_dim}" + (" (over queries: roles swapped)"
                                                          if core.roles_swapped else ""))
    heads = core.folded_batch // batch_size if batch_size and core.folded_batch % batch_size == 0 else 1
    if heads > 1:
        parts.append(f"{heads} heads")
    if n_pixels and core.n_keys != core.n_queries:
        parts.append(f"keys pooled ({core.n_queries} queries, {core.n_keys} keys)")
    parts.append(f"d_v {core.d_v}")
    return ", ".join(parts)


def analyse(run, batch_size: int, n_pixels: int) -> tuple[tuple | None, str, list[str]]:
    """Run `run()` (the layer's forward on a probe input) with every q.k contraction lazy.
    Returns (core call indices or None, pattern line, reasons when none was found)."""
    mode = AttentionCapture(cores=None)
    with mode:
        output = run()
    output, returned = mode.finish(output)
    del output
    if mode.found:
        cores = tuple(sorted({c.index for c in mode.found}))
        lines = [describe(c, batch_size, n_pixels) for c in mode.found]
        pattern = "; ".join(dict.fromkeys(lines))
        if returned:
            pattern += ", map returned"
        if mode.reasons:  # a second softmax chain that broke: be safe
            return None, pattern, mode.reasons
        return cores, pattern, []
    reasons = list(dict.fromkeys(mode.reasons))
    if not reasons:
        reasons = (["the softmax output is never contracted with v"] if mode.softmax_seen
                   else ["no softmax between two contractions"])
    return None, "", reasons


def warn_miss(name: str, misses: list) -> None:
    warnings.warn(f"fastattn: the attention core of {name} was not where it was found at swap time "
                  f"(call {misses}); this call ran the original math", RuntimeWarning, stacklevel=3)
