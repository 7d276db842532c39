"""The built-in backends, registered with fastattn.dispatch on import.

Neither imports triton or CUDA here: the Triton backend loads its kernels on first use, and a
failure to load them becomes a reason it is unavailable (see `fastattn info`).
"""
from ..dispatch import register_backend
from .sdpa import SdpaBackend
from .torch_chunked import TorchChunkedBackend
from .torch_small import TorchBackend
from .triton import TritonBackend

__all__ = ["SdpaBackend", "TorchBackend", "TorchChunkedBackend", "TritonBackend"]

register_backend(TorchBackend())  # `torch`: kept probabilities when small, chunked otherwise
register_backend(SdpaBackend())
register_backend(TritonBackend())
