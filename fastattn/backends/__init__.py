"""The built-in backends, registered with fastattn.dispatch on import.

Neither imports triton or CUDA here: the Triton backend loads its kernels on first use, and a
failure to load them becomes a reason it is unavailable (see `fastattn info`).
"""
from ..dispatch import register_backend
from .torch_chunked import TorchChunkedBackend
from .triton import TritonBackend

__all__ = ["TorchChunkedBackend", "TritonBackend"]

register_backend(TorchChunkedBackend())
register_backend(TritonBackend())
