"""fastattn: fused, memory-efficient spatial self-attention for attention GANs."""
from .dispatch import BackendUnavailableError, available_backends
from .functional import spatial_attention
from .reference import reference_attention
from .attention_map import AttentionMap, attention_rows, save_attention_png
from .nn import SelfAttention2d

__version__ = "0.1.0"

__all__ = [
    "AttentionMap",
    "BackendUnavailableError",
    "SelfAttention2d",
    "attention_rows",
    "save_attention_png",
    "available_backends",
    "reference_attention",
    "spatial_attention",
    "__version__",
]
