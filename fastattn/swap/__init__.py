"""Swapping fastattn into existing models: find attention layers, verify, replace their forward.

    families.py  the known layer structures (and register_adapter for users' own)
    forward.py   the forward installed on a swapped instance, install/uninstall
    probe.py     the side-by-side check of original and swapped forward before a swap
    native.py    fastattn's own SelfAttention2d: its attention mode switched, and back
    handle.py    SwapHandle: what was swapped or skipped and why; revert; recording
    api.py       swap_attention, unswap
"""
from .api import swap_attention, unswap
from .families import AttentionFamily, register_adapter, unregister_adapter
from .forward import is_swapped, run_family
from .handle import SkippedLayer, SwapHandle, SwappedLayer

__all__ = ["swap_attention", "unswap", "SwapHandle", "SwappedLayer", "SkippedLayer", "AttentionFamily",
           "register_adapter", "unregister_adapter", "run_family", "is_swapped"]
