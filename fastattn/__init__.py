"""fastattn: fused, memory-efficient spatial self-attention for attention GANs."""
from .dispatch import BackendUnavailableError, available_backends
from .functional import spatial_attention
from .reference import reference_attention

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "reference_attention",
    "spatial_attention",
    "__version__",
]
