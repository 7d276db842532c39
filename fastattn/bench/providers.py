"""The implementations a benchmark compares. Each takes channel-major q (B, d_qk, N), k (B, d_qk, M),
v (B, d_v, M) and returns out (B, d_v, N), differentiable.

A provider that cannot run a case is recorded as "not supported: <reason>" (the reason taken from
the library's own error or warnings), never silently replaced by another implementation.
"""
from __future__ import annotations

import re
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import BENCH_MEMORY_FRACTION
from ..reference import reference_attention
from .presets import DTYPES, Case, naive_bytes

__all__ = ["ALL_PROVIDERS", "NotSupported", "chosen_backend", "default_providers", "make_provider", "skip_reason"]

# sdpa: PyTorch's own dispatch; sdpa-<backend>: one SDPA backend forced via sdpa_kernel.
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
# <sdpa name>+copy: SDPA on token-major contiguous copies (the copies are timed too). The fused SDPA
# kernels want the last dimension contiguous, which the channel-major views are not.
SDPA_COPY = tuple(f"{name}+copy" for name in ("sdpa", *SDPA_BACKENDS))
# fastattn: automatic backend choice (what `spatial_attention` and the layers do by default; the
# record names the backend it chose); fastattn-<name>: that backend forced.
ALL_PROVIDERS = ("naive", "sdpa", *SDPA_BACKENDS, *SDPA_COPY, "flex", "fastattn", "fastattn-torch",
                 "fastattn-triton", "naive-compile")
# Providers that materialise the (B, N, M) matrices, so the memory budget applies to them.
_MATERIALISING = ("naive", "naive-compile", "sdpa-math")

Fn = Callable[[Tensor, Tensor, Tensor, float], Tensor]


class NotSupported(Exception):
    """A provider cannot run this case; the message is the reason recorded."""


def default_providers(device: torch.device) -> list[str]:
    """What runs when --provider is not given. On CPU, Triton only runs interpreted (slow, and not
    for automatic use) and torch.compile's C++ build takes minutes: both only on request."""
    if device.type == "cuda":
        return ["naive", *SDPA_BACKENDS, "sdpa-efficient+copy", "sdpa-cudnn+copy", "flex", "fastattn-torch",
                "fastattn-triton", "naive-compile"]
    return ["naive", "sdpa", "fastattn"]


def skip_reason(provider: str, case: Case, device: torch.device, free_bytes: int) -> str | None:
    """A reason not to start a provider on a case (before running it), or None."""
    if provider in _MATERIALISING:
        s = case.site
        need = naive_bytes(s.B, s.N, s.M, DTYPES[case.dtype], case.direction)
        budget = BENCH_MEMORY_FRACTION * free_bytes
        if need > budget:
            return (f"its ({s.B}, {s.N}, {s.M}) attention matrices need ~{need / 2**30:.1f} GiB, over the "
                    f"budget of {budget / 2**30:.1f} GiB (BENCH_MEMORY_FRACTION of free memory); lower --batch")
    base = provider.removesuffix("+copy")
    if base.startswith("sdpa-") and device.type != "cuda" and base not in ("sdpa-math", "sdpa-flash"):
        return f"SDPA backend {SDPA_BACKENDS[base]} runs on CUDA only, this device is {device.type}"
    return None


def _to_token_major(t: Tensor, copy: bool) -> Tensor:
    # (B, d, L) -> (B, 1, L, d), a view unless `copy`: SDPA's fused kernels want a heads dimension.
    t = t.transpose(1, 2).unsqueeze(1)
    return t.contiguous() if copy else t


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, copy: bool = False) -> Tensor:
    q, k, v = (_to_token_major(t, copy) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.squeeze(1).transpose(1, 2)  # (B, d_v, N), a view


def _sdpa_forced(backend_name: str, copy: bool) -> Fn:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as error:  # older torch
        raise NotSupported(f"torch.nn.attention.sdpa_kernel is not available: {error}") from error
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise NotSupported(f"this torch has no SDPA backend {backend_name}")

    def run(q, k, v, scale):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    return _sdpa(q, k, v, scale, copy)
            except RuntimeError as error:
                why = [re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)).strip()
                       for w in caught if issubclass(w.category, UserWarning)]
                raise NotSupported("; ".join(why + [str(error).splitlines()[0]])) from error
    return run


def chosen_backend(provider: str, q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """The fastattn backend a fastattn provider runs these inputs on (None for other providers,
    or when no backend can run them)."""
    from ..dispatch import BackendUnavailableError, select_backend

    if provider != "fastattn" and not provider.startswith("fastattn-"):
        return None
    try:
        return select_backend(q, k, v, None if provider == "fastattn" else provider.removeprefix("fastattn-")).name
    except BackendUnavailableError:
        return None


def _fastattn(backend: str | None) -> Fn:
    from ..dispatch import BackendUnavailableError
    from ..functional import spatial_attention

    def run(q, k, v, scale):
        try:
            return spatial_attention(q, k, v, scale=scale, backend=backend)
        except BackendUnavailableError as error:
            raise NotSupported(" ".join(str(error).split())) from error
    return run


_COMPILED = []
# Distinct (shape, dtype, grad mode) graphs one benchmark run may compile; dynamo's default
# recompile limit (8) would make later cases run eagerly without saying so.
_RECOMPILE_LIMIT = 256


def _compiled_naive() -> Fn:
    """torch.compile of the naive path with default options (automatic dynamic shapes after the
    first recompile), as a user would write it; one compiled function per process."""
    if not _COMPILED:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), _RECOMPILE_LIMIT))
        _COMPILED.append(torch.compile(reference_attention))
    compiled = _COMPILED[0]

    def run(q, k, v, scale):
        try:
            return compiled(q, k, v, scale)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            raise
        except Exception as error:  # inductor needs a C++/Triton toolchain
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise NotSupported(f"torch.compile failed: {type(error).__name__}: {first}") from error
    return run


_FLEX = []


def _flex_attention() -> Fn:
    """FlexAttention (torch.nn.attention.flex_attention) on token-major copies, compiled (it is a
    fused kernel only under torch.compile; eager flex_attention runs the math path)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:
        raise NotSupported(f"torch.nn.attention.flex_attention is not available: {error}") from error
    if not _FLEX:
        _FLEX.append(torch.compile(flex_attention))
    compiled = _FLEX[0]

    def run(q, k, v, scale):
        try:
            out = compiled(*(_to_token_major(t, True) for t in (q, k, v)), scale=scale)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            raise
        except Exception as error:  # unsupported head widths, no compiler toolchain, ...
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise NotSupported(f"flex_attention failed: {type(error).__name__}: {first}") from error
        return out.squeeze(1).transpose(1, 2)
    return run


def make_provider(name: str) -> Fn:
    """The callable for one provider; raises NotSupported when it cannot be built here."""
    if name == "naive":
        return lambda q, k, v, scale: reference_attention(q, k, v, scale)
    copy = name.endswith("+copy")
    base = name.removesuffix("+copy")
    if base == "sdpa":
        return lambda q, k, v, scale: _sdpa(q, k, v, scale, copy)
    if base in SDPA_BACKENDS:
        return _sdpa_forced(SDPA_BACKENDS[base], copy)
    if name == "fastattn":
        return _fastattn(None)
    if name == "fastattn-torch":
        return _fastattn("torch")
    if name == "fastattn-triton":
        return _fastattn("triton")
    if name == "naive-compile":
        return _compiled_naive()
    if name == "flex":
        return _flex_attention()
    raise ValueError(f"provider must be one of {list(ALL_PROVIDERS)}, got {name!r}")

