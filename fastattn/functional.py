"""The public functional API: `spatial_attention`. Validation happens here, once."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import backends  # noqa: F401  (registers the built-in backends with dispatch)
from .dispatch import check_backend_name, env_backend, registry_token, select_backend
from .reference import accumulation_dtype, default_scale

__all__ = ["spatial_attention", "validate_inputs", "resolve_scale", "clear_dispatch_cache"]

# Per-call Python is a measurable share of a small call (a CIFAR-sized forward is ~0.1 ms on one
# CPU thread, and validation plus automatic choice cost ~10 us of it). Both depend only on the
# inputs' signature (type, shape, strides, dtype, device), the scale, the backend request and the
# registered backends, so a call whose signature was seen before skips them. With the torch thread
# count in the key too, the backend's own strategy for the signature is remembered as well
# (Backend.out_runner), so a repeated call runs its ops after one dictionary lookup. Strides are
# part of the key because a backend's reasons may read them (Triton's int32 span check). Reasons
# and strategies read from fastattn.constants are remembered with the choice:
# clear_dispatch_cache() after changing them.
_CHOICES: dict = {}
_CHOICES_MAX = 1024
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
_get_num_threads = torch.get_num_threads


def clear_dispatch_cache() -> None:
    """Forget every remembered (validated inputs -> backend) choice of spatial_attention."""
    _CHOICES.clear()


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYOUT = {"q": "(B, d_qk, N)", "k": "(B, d_qk, M)", "v": "(B, d_v, M)"}


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise TypeError/ValueError naming the argument, what was received and what was expected."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {_LAYOUT[name]}, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must have 3 dimensions {_LAYOUT[name]} (channel-major, e.g. conv(x).flatten(2)), "
                f"got {t.dim()} dimensions with shape {_shape(t)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}: q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: q, k and v must be on one device")
    batch, d_qk, _ = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        bad, t = ("k", k) if k.shape[0] != batch else ("v", v)
        raise ValueError(
            f"{bad} has batch size {t.shape[0]} (shape {_shape(t)}) but q has batch size {batch} "
            f"(shape {_shape(q)}): expected {bad} of shape ({batch}, {t.shape[1]}, {t.shape[2]})"
        )
    if k.shape[1] != d_qk:
        raise ValueError(
            f"k has d_qk={k.shape[1]} channels (shape {_shape(k)}) but q has d_qk={d_qk} (shape {_shape(q)}): "
            f"expected k of shape ({batch}, {d_qk}, M)"
        )
    if v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v has M={v.shape[2]} keys/values (shape {_shape(v)}) but k has M={k.shape[2]} (shape {_shape(k)}): "
            f"expected v of shape ({batch}, d_v, {k.shape[2]})"
        )
    if k.shape[2] == 0:
        raise ValueError(
            f"k and v have M=0 keys (k shape {_shape(k)}): expected M >= 1, a softmax over no keys is undefined"
        )


def resolve_scale(scale, d_qk: int) -> float:
    """`scale=None` means 1/sqrt(d_qk), as in torch.nn.functional.scaled_dot_product_attention."""
    if scale is None:
        return default_scale(d_qk)
    # torch.SymFloat/SymInt: a scale traced by torch.compile(dynamic=True); float() specialises it
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    try:
        scale = float(scale)
    except OverflowError:  # an int beyond float's range, e.g. 10**400
        raise ValueError(f"scale must be finite, got an integer of {len(str(abs(int(scale))))} digits, "
                         f"beyond the largest float (~1.8e308)") from None
    if scale != scale or abs(scale) == math.inf:  # not math.isfinite: traceable on a SymFloat
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def spatial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = 1.0,
    backend: str | None = None,
    return_lse: bool = False,
):
    """Spatial self-attention as attention-GAN layers compute it, without the N x M matrix.

    q: (B, d_qk, N), k: (B, d_qk, M), v: (B, d_v, M), channel-major as 1x1 convs produce them;
    any strides (conv(x).flatten(2), max-pooled maps, transposed token-major tensors) are read
    without copying. Returns out (B, d_v, N) with

        out[b, :, i] = sum_j v[b, :, j] * softmax_j(scale * q[b, :, i] . k[b, :, j])

    scale: 1.0 by default (GAN layers do not scale logits); None means 1/sqrt(d_qk).
    backend: None picks the fastest backend that can run the input; a name ("torch", "triton")
        forces it and raises BackendUnavailableError with the reasons when it cannot run.
        The FASTATTN_BACKEND environment variable does the same when backend is None.
    Meta tensors (deferred initialisation, shape inference) give empty meta results of the right
    shapes and dtypes without running a backend.
    return_lse: also return the per-query log-sum-exp of the scaled logits, (B, N) in float32
        (float64 for float64 inputs, so that fp64 gradient checks stay exact). It is
        differentiable: d lse_i / d logit_ij is the attention probability.
    """
    key = choice = None
    if type(q) is Tensor and type(k) is Tensor and type(v) is Tensor and (scale is None or type(scale) is float) \
            and (backend is None or type(backend) is str) and not _is_compiling():
        key = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
               q.device, k.device, v.device, scale, backend, env_backend(), registry_token(), _get_num_threads())
        choice = _CHOICES.get(key)
    if choice is None:
        choice = _choose(q, k, v, scale, backend)
        if choice is None:  # meta tensors
            return _meta_attention(q, v, backend, _checked_return_lse(return_lse))
        if key is not None:
            if len(_CHOICES) >= _CHOICES_MAX:
                _CHOICES.clear()
            _CHOICES[key] = choice
    if return_lse is False:
        return choice[2](q, k, v)
    chosen, scale, _ = choice
    _checked_return_lse(return_lse)
    out, lse = chosen.attention(q, k, v, scale)
    return out, lse.to(accumulation_dtype(q.dtype))


def _checked_return_lse(return_lse) -> bool:
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return return_lse


def _choose(q: Tensor, k: Tensor, v: Tensor, scale, backend):
    """Validate and choose: (backend, scale as a float, the backend's out runner for this
    signature), or None for meta tensors."""
    validate_inputs(q, k, v)
    scale = resolve_scale(scale, q.shape[1])
    if q.device.type == "meta":
        return None
    chosen = select_backend(q, k, v, backend)
    return chosen, scale, chosen.out_runner(q, k, v, scale)


def _meta_attention(q: Tensor, v: Tensor, backend, return_lse: bool):
    """Shapes and dtypes of spatial_attention's results on the meta device (no data, no backend)."""
    check_backend_name(backend, must_run_here=False)  # an unknown name is an error here too
    batch, n_queries = q.shape[0], q.shape[2]
    out = torch.empty((batch, v.shape[1], n_queries), dtype=q.dtype, device="meta")
    if return_lse:
        return out, torch.empty((batch, n_queries), dtype=accumulation_dtype(q.dtype), device="meta")
    return out
