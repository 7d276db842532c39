"""What the attention capture (capture.py) recognises in the torch calls a layer's forward makes:
the tables of functions, Tensor methods and operators by role (contractions, softmax, scale
multiplies and divides, views, permutes, casts, metadata reads), and the parsing of a two-operand
contraction (bmm, matmul, @, einsum, mm) into the labels of a batched matrix product."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["CONTRACT", "SOFTMAX", "SDPA", "MUL", "DIV", "VIEW", "PERMUTE", "CAST", "META_METHODS", "META_PROPS",
           "WHAT", "func_name", "property_name", "result_dtype", "einsum_labels", "contraction_operands",
           "contraction_roles", "fold", "int_dim", "constant_scalar", "call_arguments"]

T = torch.Tensor
CONTRACT = {torch.bmm: "bmm", T.bmm: "bmm", torch.matmul: "matmul", T.matmul: "matmul",
            T.__matmul__: "matmul", T.__rmatmul__: "rmatmul", torch.einsum: "einsum",
            torch.mm: "bmm2", T.mm: "bmm2"}
SOFTMAX = {F.softmax: 1, torch.softmax: 1, T.softmax: 1, torch.special.softmax: 1}
SDPA = F.scaled_dot_product_attention
MUL = {torch.mul: "mul", T.mul: "mul", T.__mul__: "mul", T.__rmul__: "mul", torch.multiply: "mul",
       T.mul_: "imul", T.__imul__: "imul"}
DIV = {torch.div: "div", T.div: "div", T.__truediv__: "div", torch.true_divide: "div",
       T.div_: "idiv", T.__itruediv__: "idiv"}
VIEW = {T.view: "view", T.reshape: "view", torch.reshape: "view", T.flatten: "view",
        torch.flatten: "view", T.unflatten: "view", torch.unflatten: "view", T.view_as: "view",
        T.reshape_as: "view", T.contiguous: "same", T.clone: "same", torch.clone: "same"}
PERMUTE = {T.permute: "permute", torch.permute: "permute", T.transpose: "transpose",
           torch.transpose: "transpose", T.swapaxes: "transpose", T.swapdims: "transpose",
           torch.swapaxes: "transpose", torch.swapdims: "transpose"}
CAST = {T.float: torch.float32, T.double: torch.float64, T.half: torch.float16,
        T.bfloat16: torch.bfloat16, T.to: None, T.type: None, T.type_as: None}
META_METHODS = {T.size, T.dim, T.numel, T.nelement, T.ndimension, T.stride, T.is_contiguous,
                T.is_floating_point, T.element_size, T.get_device, T.__len__}
META_PROPS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout",
              "is_leaf", "is_sparse", "is_quantized", "is_meta", "names"}
WHAT = {"add": "an extra term is added to", "__add__": "an extra term is added to",
        "__radd__": "an extra term is added to", "add_": "an extra term is added to",
        "__iadd__": "an extra term is added to", "sub": "a term is subtracted from",
        "__sub__": "a term is subtracted from", "masked_fill": "a mask is applied to",
        "masked_fill_": "a mask is applied to", "where": "a mask (torch.where) is applied to",
        "dropout": "dropout is applied to", "__mul__": "a tensor multiplies",
        "mul": "a tensor multiplies"}


def func_name(func) -> str:
    if getattr(func, "__name__", "") == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "?")
    return getattr(func, "__name__", repr(func))


def property_name(func) -> str | None:
    """The property name when func is a Tensor property getter (`t.shape`), else None."""
    if getattr(func, "__name__", "") == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None)
    return None


def result_dtype(device: torch.device, *dtypes) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def einsum_labels(equation: str, operands) -> tuple | None:
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2 or len(operands) != 2:
        return None
    labels, n_ellipsis = [], 0
    for term, op in zip(terms, operands):
        named = term.replace("...", "")
        if "..." in term:
            n_ellipsis = op.dim() - len(named)
            head, _, tail = term.partition("...")
            labels.append([*head, *[f".{i}" for i in range(n_ellipsis)], *tail])
        else:
            labels.append(list(term))
        if len(labels[-1]) != op.dim():
            return None
    if "->" not in eq:
        flat = labels[0] + labels[1]
        out = [f".{i}" for i in range(n_ellipsis)] + sorted(
            l for l in set(flat) if flat.count(l) == 1 and not l.startswith("."))
    else:
        head, _, tail = rhs.partition("...")
        out = [*head, *[f".{i}" for i in range(n_ellipsis if "..." in rhs else 0)], *tail]
    return labels[0], labels[1], out


def contraction_operands(kind: str, args, kwargs) -> tuple | None:
    """(a, b, labels of a, of b, of the output) for a two-operand contraction call, else None."""
    if kwargs and kind != "einsum":
        return None
    if kind == "einsum":
        ops = args[1:] if len(args) > 2 else (list(args[1]) if len(args) == 2 else [])
        if len(ops) != 2 or not all(isinstance(o, Tensor) for o in ops):
            return None
        labels = einsum_labels(args[0], ops)
        return None if labels is None else (ops[0], ops[1], *labels)
    a, b = (args[1], args[0]) if kind == "rmatmul" else (args[0], args[1])
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.dim() != b.dim() or a.dim() < 2:
        return None
    if kind == "bmm" and a.dim() != 3 or kind == "bmm2" and a.dim() != 2:
        return None
    batch = [f".{i}" for i in range(a.dim() - 2)]
    if tuple(a.shape[:-2]) != tuple(b.shape[:-2]):
        return None
    return a, b, [*batch, "i", "j"], [*batch, "j", "k"], [*batch, "i", "k"]


def contraction_roles(la, lb, lo):
    """(batch labels in output order, contracted, a-only, b-only) or None when the contraction is
    not one batch-matmul (a label in one operand only and not in the output, a repeated label)."""
    if len(set(la)) != len(la) or len(set(lb)) != len(lb) or len(set(lo)) != len(lo):
        return None
    if any(l not in la and l not in lb for l in lo):
        return None
    if any(l not in lo and l not in lb for l in la) or any(l not in lo and l not in la for l in lb):
        return None
    batch = [l for l in lo if l in la and l in lb]
    contracted = [l for l in la if l in lb and l not in lo]
    a_only = [l for l in la if l not in lb]
    b_only = [l for l in lb if l not in la]
    return batch, contracted, a_only, b_only


def fold(t: Tensor, labels, batch, mid: str, last: str) -> Tensor:
    """t permuted to (batch..., mid, last) and folded to (prod(batch), |mid|, |last|)."""
    order = [labels.index(l) for l in batch] + [labels.index(mid), labels.index(last)]
    t = t.permute(order)
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def int_dim(dim, ndim: int) -> int | None:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
        return None
    return dim % ndim


def constant_scalar(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad \
            and value.is_floating_point():
        return float(value)
    return None


def call_arguments(args: tuple, kwargs: dict):
    """The leaves of a call's arguments: the arguments themselves when none is a list, tuple or
    dict (the common case, and what a swapped layer pays on each op and each call), pytree's
    leaves otherwise."""
    values = (*args, *kwargs.values())
    for value in values:
        if isinstance(value, (list, tuple, dict)):
            return pytree.tree_leaves(values)
    return values
