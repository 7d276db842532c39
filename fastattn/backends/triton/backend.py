"""The Triton backend as dispatch sees it: what it supports, and the call into its operators.

Triton and the kernels are loaded lazily (`load_ops`), by the first check or call of this backend,
never by `import fastattn`; when they cannot load, the error is the reason this backend is
unavailable.
On CPU tensors the kernels run in Triton's interpreter, which must have been switched on with
TRITON_INTERPRET=1 before triton was first imported; that is correct but slow, so automatic
choice never picks it: ask for backend="triton" explicitly.
"""
from __future__ import annotations

import torch

from ...dispatch import Backend

__all__ = ["TritonBackend", "load_ops", "MAX_D_QK", "MAX_D_V", "MAX_BATCH", "MAX_ELEMENTS_PER_SAMPLE"]

# Widest q/k channel count: d_qk is padded to a power of two and held in registers, and 256 is
# the widest tile that still leaves room for the accumulators (C = 2048 channels at C // 8).
MAX_D_QK = 256
# Widest value channel count: wider values are split across programs, so this only bounds the
# backward's dp loop and the launch grid; 8192 covers every GAN (C <= 2048) with a wide margin.
MAX_D_V = 8192
# The batch is grid axis 2, which CUDA limits to 65535 programs.
MAX_BATCH = 65535
# Offsets within one batch element are int32 in the kernels (the batch offset is int64): the
# span a strided view reaches within one batch element, not its element count, must stay below.
MAX_ELEMENTS_PER_SAMPLE = 2**31
_CPU_NEEDS_INTERPRETER = (
    "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is first imported "
    "(or move the tensors to a CUDA device)"
)


def _in_sample_span(t) -> int:
    """1 + the largest element offset within one batch element of a (B, C, L) view: what the
    kernels' int32 offsets must address (a channel slice of a wide conv output or a
    channels_last view spans more than its C * L elements)."""
    if any(size == 0 for size in t.shape[1:]):
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


_ops = None
_load_error: str | None = None


def load_ops():
    """The operators module (fastattn.backends.triton.ops), importing triton and the kernels on
    the first call. Raises ImportError saying why when they cannot load; later calls repeat it."""
    global _ops, _load_error
    if _ops is None and _load_error is None:
        try:
            from . import ops
        except Exception as error:  # ImportError, or a broken install raising something else
            _load_error = _why_not_loaded(error)
        else:
            _ops = ops
    if _ops is None:
        raise ImportError(_load_error)
    return _ops


def _why_not_loaded(error: BaseException) -> str:
    missing = getattr(error, "name", None)
    if isinstance(error, ModuleNotFoundError) and missing and missing.split(".")[0] == "triton":
        return f"triton is not importable ({type(error).__name__}: {error}); pip install triton"
    return f"the Triton kernels failed to load ({type(error).__name__}: {error})"


def _interpreting() -> bool:
    return load_ops().interpreting()


class TritonBackend(Backend):
    name = "triton"
    priority = 100

    def unavailable(self) -> list[str]:
        try:
            load_ops()
        except ImportError as error:
            return [str(error)]
        return []

    def unsupported(self, q, k, v) -> list[str]:
        reasons = []
        batch, d_qk, _ = q.shape
        d_v = v.shape[1]
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16 or float32); "
                           "use backend='torch' for float64")
        if d_qk > MAX_D_QK:
            reasons.append(f"d_qk={d_qk} q/k channels is more than the kernels' maximum of {MAX_D_QK}")
        if d_v > MAX_D_V:
            reasons.append(f"d_v={d_v} value channels is more than the kernels' maximum of {MAX_D_V}")
        if batch > MAX_BATCH:
            reasons.append(f"batch size {batch} is more than the launch grid's maximum of {MAX_BATCH}")
        n_queries, n_keys = q.shape[2], k.shape[2]
        # the inputs as strided, out and the gradients as the contiguous buffers the kernels write
        per_sample = max(_in_sample_span(q), _in_sample_span(k), _in_sample_span(v),
                         max(d_qk, d_v, 1) * max(n_queries, n_keys))
        if per_sample >= MAX_ELEMENTS_PER_SAMPLE:
            reasons.append(f"one batch element of q, k, v or out spans {per_sample} elements (as strided), at "
                           f"least the {MAX_ELEMENTS_PER_SAMPLE} (2**31) that the kernels' int32 in-sample "
                           "offsets can address; pass contiguous tensors (.contiguous()) if they are views")
        device = q.device
        if device.type == "cpu":
            if not _interpreting():
                reasons.append(_CPU_NEEDS_INTERPRETER)
        elif device.type == "cuda":
            if torch.version.cuda is not None:  # NVIDIA (ROCm builds report torch.version.hip)
                major, minor = torch.cuda.get_device_capability(device)
                if (major, minor) < (7, 5):
                    reasons.append(f"CUDA compute capability {major}.{minor} is below the 7.5 Triton's tl.dot needs")
                elif q.dtype == torch.bfloat16 and major < 8:
                    reasons.append(f"bfloat16 needs CUDA compute capability 8.0 or newer, this device is {major}.{minor}")
        else:
            reasons.append(f"tensors on {device.type}: the kernels run on CUDA devices "
                           "(or on CPU under TRITON_INTERPRET=1)")
        if device.type == "cpu" and q.dtype == torch.bfloat16 and not reasons:
            reasons.append("bfloat16 on CPU: Triton's interpreter cannot run bfloat16 tl.dot")
        return reasons

    def not_automatic(self, q, k, v) -> list[str]:
        if q.device.type == "cpu":
            return ["CPU tensors run in Triton's interpreter, which is correct but very slow: "
                    "used only when backend='triton' is asked for"]
        if _interpreting():
            return ["TRITON_INTERPRET=1 is set, so the kernels would run in the slow interpreter: "
                    "used only when backend='triton' is asked for"]
        return []

    def attention(self, q, k, v, scale):
        return load_ops().attention(q, k, v, scale)
