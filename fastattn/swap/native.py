"""Swapping fastattn's own SelfAttention2d: its `attention`/`backend` attributes, and back.

Each swap of a layer pushes (token, before, after) on a list kept as a plain instance attribute
(`NATIVE`): no buffer or parameter, so the state_dict is unchanged, and deepcopy, pickle and
torch.save copy it with the layer, so `fastattn.unswap` can give a copy its pre-swap mode too.
Reverting a swap restores the mode from before it and drops it and every later swap of the layer:
two swaps reverted in either order end as the original.
"""
from __future__ import annotations

import itertools

from ..nn import SelfAttention2d

__all__ = ["NATIVE", "native_swap", "native_unswap"]

NATIVE = "_fastattn_native_swaps"
_TOKENS = itertools.count()


def _mode(module: SelfAttention2d) -> tuple[str, str | None]:
    return module.attention, module.backend


def native_swap(module: SelfAttention2d, backend: str | None):
    """Switch the layer to attention="fastattn" with `backend`; returns revert() -> bool."""
    token, after = next(_TOKENS), ("fastattn", backend)
    module.__dict__.setdefault(NATIVE, []).append((token, _mode(module), after))
    module.attention, module.backend = after

    def revert() -> bool:
        stack = module.__dict__.get(NATIVE, [])
        index = next((i for i, (t, _, _) in enumerate(stack) if t == token), None)
        if index is None or _mode(module) != stack[-1][2]:  # reverted, or changed since by other code
            return False
        module.attention, module.backend = stack[index][1]
        del stack[index:]
        if not stack:
            del module.__dict__[NATIVE]
        return True

    return revert


def native_unswap(module: SelfAttention2d) -> bool:
    """Give the layer the mode it had before its first swap (any copy of a swapped layer too).
    A layer whose mode other code changed after the swap keeps that mode. Returns whether it
    was reverted."""
    stack = module.__dict__.pop(NATIVE, None)
    if not stack or _mode(module) != stack[-1][2]:
        return False
    module.attention, module.backend = stack[0][1]
    return True
