"""fastattn: fused, memory-efficient spatial self-attention for attention GANs."""
from .dispatch import BackendUnavailableError, available_backends
from .functional import spatial_attention
from .reference import reference_attention
from .attention_map import AttentionMap, attention_rows
from .viz import save_attention_png
from .nn import SelfAttention2d
from .swap import AttentionFamily, SwapHandle, register_adapter, swap_attention, unregister_adapter, unswap
from .verification import VerifyReport, verify

from .version import __version__

__all__ = [
    "AttentionFamily",
    "AttentionMap",
    "BackendUnavailableError",
    "SelfAttention2d",
    "SwapHandle",
    "VerifyReport",
    "attention_rows",
    "register_adapter",
    "save_attention_png",
    "swap_attention",
    "unregister_adapter",
    "unswap",
    "verify",
    "available_backends",
    "reference_attention",
    "spatial_attention",
    "__version__",
]
