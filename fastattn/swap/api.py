"""`swap_attention(model)`: make the attention layers already inside a model run through fastattn.

The layers are found by structure (`families.py`), never by importing the user's code, verified
by the probe (`probe.py`) and swapped by replacing `forward` on the instance (`forward.py`);
`handle.revert()` (`handle.py`) gives them their own forward back.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..dispatch import check_backend_name
from ..nn import SelfAttention2d
from .families import match
from .forward import STATE, SwapState, install_forward, uninstall_forward
from .handle import SkippedLayer, SwapHandle, SwappedLayer
from .probe import probe

__all__ = ["swap_attention"]

def _native_swap(module: SelfAttention2d, backend: str | None):
    """fastattn's own layer: switch a naive-mode SelfAttention2d to the fused path (and back)."""
    before = (module.attention, module.backend)
    module.attention, module.backend = "fastattn", backend

    def revert() -> bool:
        if (module.attention, module.backend) != ("fastattn", backend):
            return False
        module.attention, module.backend = before
        return True

    return revert


class _Unset:
    def __repr__(self) -> str:
        return "None"


_UNSET = _Unset()  # backend= not passed


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
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, SelfAttention2d):
            if module.attention == "fastattn" and (not backend_given or module.backend == backend):
                handle.already_swapped.append(SwappedLayer(name, "fastattn", kind))
            else:
                record = SwappedLayer(name, "fastattn", kind)
                handle.swapped.append(record)
                handle._installed.append((record, _native_swap(module, backend)))
            continue
        if STATE in module.__dict__:
            handle.already_swapped.append(SwappedLayer(name, module.__dict__[STATE].family.name, kind))
            continue
        matches = match(module)
        if not matches:
            continue
        reasons = {m.family.name: list(m.reasons) for m in matches}
        chosen = None
        for candidate in (m for m in matches if m.ok):
            if "forward" in module.__dict__ or "_replicate_for_data_parallel" in module.__dict__:
                reasons[candidate.family.name] = ["its forward is already replaced on this instance by other code"]
                continue
            failure = probe(module, candidate.family) if verify else None
            if failure:
                reasons[candidate.family.name] = [failure]
                continue
            chosen = candidate.family
            break
        if chosen is None:
            handle.skipped.append(SkippedLayer(name, kind, reasons))
            continue
        state = SwapState(chosen, backend)
        install_forward(module, state)
        record = SwappedLayer(name, chosen.name, kind)
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
