"""`swap_attention(model)`: make the attention layers already inside a model run through fastattn.

A layer is found in two ways, never by importing the user's code: by structure (`families.py`,
the fast path: names and shapes of a known family), else by what its forward computes
(`capture.py`: the softmax(q^T k) v core found in a trace of the forward on a probe input). Either
way it is verified by the probe (`probe.py`) and swapped by replacing `forward` on the instance
(`forward.py`); `handle.revert()` (`handle.py`) gives it its own forward back, `unswap(model)`
gives every swapped layer in any model (copies of a swapped model too) its own forward back.

Which modules are traced: those whose class's own methods call softmax or
scaled_dot_product_attention, or that hold an nn.Softmax child, and are not torch.nn's own. A
module whose forward mentions attention only through children (a generator, a residual block) is
not traced: its attention children are found themselves. Once a module is swapped by capture, its
descendants run inside its forward and are left as they are.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..dispatch import check_backend_name
from ..nn import SelfAttention2d
from .families import match
from .forward import STATE, SwapState, install_forward, uninstall_forward
from .handle import SkippedLayer, SwapHandle, SwappedLayer
from .native import native_swap, native_unswap
from .probe import capture_and_probe, probe

__all__ = ["swap_attention", "unswap"]


class _Unset:
    def __repr__(self) -> str:
        return "None"


_UNSET = _Unset()  # backend= not passed


_ATTENTION_NAMES = {"softmax", "Softmax", "scaled_dot_product_attention"}


def _code_names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):  # nested functions and comprehensions
            names |= _code_names(const)
    return names


def _traceable_candidate(module: nn.Module) -> bool:
    """Whether the module looks like it computes attention itself (see the module docstring):
    its class's own methods name softmax / scaled_dot_product_attention in their bytecode (works
    without source files, e.g. for classes defined in a notebook or exec), or it holds an
    nn.Softmax child."""
    cls = type(module)
    if cls.__module__.startswith("torch.") or cls.__module__.startswith("fastattn."):
        return False
    if any(isinstance(child, nn.Softmax) for child in module.children()):
        return True
    for value in vars(cls).values():
        code = getattr(getattr(value, "__func__", value), "__code__", None)
        if code is not None and _code_names(code) & _ATTENTION_NAMES:
            return True
    return False


def swap_attention(model: nn.Module, *, backend: str | None = _UNSET, strict: bool = False,
                   verify: bool = True) -> SwapHandle:
    """Make every recognised attention layer in `model` run through fastattn, in place.

    backend: the fastattn backend for the swapped layers (None, the default = automatic per
        call); a named backend that cannot run here raises now. fastattn's own SelfAttention2d
        layers already in attention="fastattn" mode count as already swapped and keep their
        backend, unless backend= is passed explicitly and differs from theirs.
    strict: raise LookupError when no attention layer was swapped (listing near misses).
    verify: run the probe (see module docstring) before swapping each layer.
    Layers that only partly match a family are left alone and listed in `handle.skipped` with
    the reasons (a UserWarning says so too). Swapping an already swapped model changes nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("strict", strict), ("verify", verify)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    backend_given = backend is not _UNSET
    backend = backend if backend_given else None
    check_backend_name(backend)
    handle = SwapHandle()
    inside_traced: list[str] = []  # qualified names of modules swapped by capture
    for name, module in model.named_modules():
        kind = type(module).__name__
        if any(name.startswith(prefix + ".") or prefix == "" for prefix in inside_traced):
            continue
        if isinstance(module, SelfAttention2d):
            if module.attention == "fastattn" and (not backend_given or module.backend == backend):
                handle.already_swapped.append(SwappedLayer(name, "fastattn", kind))
            else:
                record = SwappedLayer(name, "fastattn", kind)
                handle.swapped.append(record)
                handle._installed.append((record, native_swap(module, backend)))
            continue
        if STATE in module.__dict__:
            handle.already_swapped.append(SwappedLayer(name, module.__dict__[STATE].name, kind))
            if module.__dict__[STATE].family is None:
                inside_traced.append(name)
            continue
        matches = match(module)
        traceable = _traceable_candidate(module)
        if not matches and not traceable:
            continue
        patched = "forward" in module.__dict__ or "_replicate_for_data_parallel" in module.__dict__
        reasons = {m.family.name: list(m.reasons) for m in matches}
        state, error = None, None
        for candidate in (m for m in matches if m.ok):
            if patched:
                reasons[candidate.family.name] = ["its forward is already replaced on this instance by other code"]
                continue
            failure, error = probe(module, candidate.family) if verify else (None, None)
            if failure:
                reasons[candidate.family.name] = [failure]
                continue
            state = SwapState(candidate.family, backend, layer=name)
            break
        if state is None and traceable:
            if patched:
                reasons["traced"] = ["its forward is already replaced on this instance by other code"]
            else:
                cores, pattern, error, why = capture_and_probe(module, backend)
                if cores is None:
                    reasons["traced"] = [f"{why[0]}" + (f" (found: {pattern})" if pattern else "")]
                    reasons["traced"] += why[1:]
                else:
                    state = SwapState(None, backend, cores=cores, pattern=pattern, layer=name)
        if state is None:
            handle.skipped.append(SkippedLayer(name, kind, reasons))
            continue
        install_forward(module, state)
        if state.family is None:
            inside_traced.append(name)
        pattern = state.pattern or (state.family.source if state.family else "")
        record = SwappedLayer(name, state.name, kind, pattern, error)
        handle.swapped.append(record)
        handle._installed.append((record, lambda module=module, state=state: uninstall_forward(module, state)))
        handle._states.append((name, state))
    if strict and not handle.swapped and not handle.already_swapped:
        raise LookupError("swap_attention(strict=True) found no attention layer to swap in "
                          f"{type(model).__name__}" + (":\n" + handle.summary() if handle.skipped else
                                                       " (no module has the structure of a known family)"))
    if handle.skipped:
        warnings.warn("fastattn.swap_attention left attention-like layers unswapped:\n"
                      + "\n".join(str(s) for s in handle.skipped), UserWarning, stacklevel=2)
    return handle


def unswap(model: nn.Module) -> list[str]:
    """Give every layer fastattn swapped in `model` its original forward back, in place, and
    return their qualified names. Works on any model, not only the one a `SwapHandle` came
    from: deep copies (EMA generators), `torch.save`/`torch.load` copies, the module inside an
    nn.DataParallel or a torch.compile wrapper. fastattn's own SelfAttention2d layers get the
    attention/backend they had before they were swapped. A model with nothing swapped gives []."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    reverted = []
    for name, module in model.named_modules(remove_duplicate=False):
        if uninstall_forward(module) or isinstance(module, SelfAttention2d) and native_unswap(module):
            reverted.append(name)
    return reverted
