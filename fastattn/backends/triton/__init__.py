"""The Triton backend: the fused kernels of `kernels/` (installed as fastattn.kernels), their
torch.library operators (ops.py) and the backend that dispatch chooses (backend.py).

ops.py is the only module that imports the kernels; backend.py loads it on first use, so
`import fastattn` imports neither triton nor the kernels.
"""
from .backend import MAX_BATCH, MAX_D_QK, MAX_D_V, MAX_ELEMENTS_PER_SAMPLE, TritonBackend, load_ops

__all__ = ["TritonBackend", "load_ops", "MAX_D_QK", "MAX_D_V", "MAX_BATCH", "MAX_ELEMENTS_PER_SAMPLE"]
