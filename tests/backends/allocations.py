"""A dispatch mode that records the largest tensor any op creates (shared by the memory tests)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """largest_numel / largest_bytes: of the largest tensor any op created while the mode was on."""

    def __init__(self):
        super().__init__()
        self.largest_numel = self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest_numel = max(self.largest_numel, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out
