"""Backends and the choice between them.

Each backend declares what it supports: `unavailable()` gives the reasons it cannot run at all
on this machine (a missing package, say) and `unsupported(q, k, v)` the reasons it cannot take a
particular input. Automatic choice takes the highest-priority backend with no reasons. A backend
asked for by name (the `backend=` argument, or the FASTATTN_BACKEND environment variable) is used
or an error lists why it cannot run: there is never a silent substitute.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from functools import partial
from typing import Callable

from torch import Tensor

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "ENV_VAR",
    "available_backends",
    "get_backend",
    "register_backend",
    "select_backend",
    "backend_report",
    "check_backend_name",
    "env_backend",
    "registry_token",
]

ENV_VAR = "FASTATTN_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend (or every backend, for automatic choice) cannot run this input."""


class Backend(ABC):
    """One way of computing `spatial_attention`. Subclasses are stateless singletons."""

    #: name used by `backend=` and FASTATTN_BACKEND
    name: str = ""
    #: higher is preferred by automatic choice
    priority: int = 0

    def unavailable(self) -> list[str]:
        """Reasons this backend cannot run at all here (empty when it can)."""
        return []

    @abstractmethod
    def unsupported(self, q: Tensor, k: Tensor, v: Tensor) -> list[str]:
        """Reasons this backend cannot take these (already validated) inputs."""

    @abstractmethod
    def attention(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """Differentiable (out, lse); inputs are validated, `scale` is a float."""

    def attention_out(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Differentiable out alone, when the caller does not want lse: a backend may skip the
        work lse alone needs (the result must equal `attention(...)[0]`)."""
        return self.attention(q, k, v, scale)[0]

    def out_runner(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """A function (q, k, v) -> attention_out(q, k, v, scale) for inputs of this signature
        (shapes, strides, dtypes, devices) and the current torch thread count: spatial_attention
        remembers it per signature, so a backend can decide its strategy once here instead of at
        every call. What may change between calls of one signature (grad mode, requires_grad,
        autocast) must still be read by the function itself."""
        return partial(self.attention_out, scale=scale)

    def not_automatic(self, q: Tensor, k: Tensor, v: Tensor) -> list[str]:
        """Reasons automatic choice must pass this backend over even though it could run
        (e.g. Triton's CPU interpreter: correct but slow, so only on explicit request)."""
        return []

    def reasons(self, q: Tensor, k: Tensor, v: Tensor) -> list[str]:
        return self.unavailable() or self.unsupported(q, k, v)


# The built-in backends register themselves when fastattn.backends is imported (fastattn/__init__
# imports it): this module imports no backend, so imports run one way, backends -> dispatch.
_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend under `backend.name`."""
    if not isinstance(backend, Backend) or not backend.name:
        raise TypeError(f"backend must be a named fastattn.dispatch.Backend instance, got {backend!r}")
    _REGISTRY[backend.name] = backend
    return backend


def available_backends() -> dict[str, Backend]:
    """All known backends by name, highest priority first."""
    return dict(sorted(_REGISTRY.items(), key=lambda item: -item[1].priority))


def get_backend(name: str, *, source: str = "backend") -> Backend:
    """The backend called `name`; `source` names where the name came from, for the error."""
    backends = available_backends()
    if name not in backends:
        if source == "backend":
            expected = f"backend must be one of {sorted(backends)} or None (automatic)"
        else:
            expected = f"{source} must name one of {sorted(backends)} (or be unset)"
        raise ValueError(f"{expected}, got {name!r}")
    return backends[name]


def check_backend_name(backend: str | None, *, must_run_here: bool = True) -> None:
    """Check a backend= argument before any input exists (layers, swap_attention): None passes;
    otherwise TypeError for a non-str, ValueError for an unknown name and, with must_run_here,
    BackendUnavailableError when the named backend cannot run on this machine at all."""
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    chosen = get_backend(backend)
    reasons = chosen.unavailable() if must_run_here else []
    if reasons:
        raise BackendUnavailableError(f"backend {backend!r} (requested by backend=) cannot run here: "
                                      f"{'; '.join(reasons)}. Pass backend=None for automatic choice.")


def _format_reasons(reasons_by_name: dict[str, list[str]]) -> str:
    return "\n".join(f"  - {name}: {'; '.join(r)}" for name, r in reasons_by_name.items())


# os.environ.get costs ~0.8 us (it encodes the key each time): spatial_attention reads the variable
# at every call, so the encoded key is made once and looked up in os.environ's own mapping, which
# os.environ[...] = and monkeypatch.setenv update (os.environ.get where that mapping is absent).
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR)  # type: ignore[attr-defined]
except (AttributeError, TypeError):
    _ENV_DATA = None


def env_backend() -> str | None:
    """The FASTATTN_BACKEND environment variable, stripped; None when unset or empty."""
    if _ENV_DATA is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        value = None if raw is None else os.environ.decodevalue(raw)  # type: ignore[attr-defined]
    else:
        value = os.environ.get(ENV_VAR)
    return value.strip() or None if value else None


def registry_token() -> tuple:
    """Changes whenever a backend is registered, replaced or removed: callers that remember a
    choice (spatial_attention) key it on this."""
    return tuple(_REGISTRY.values())


def select_backend(q: Tensor, k: Tensor, v: Tensor, backend: str | None = None) -> Backend:
    """The backend that will run these inputs: the one named (argument, else FASTATTN_BACKEND),
    or the highest-priority one that can. Raises BackendUnavailableError with every reason."""
    source = "backend="
    if backend is None:
        backend = env_backend()
        if backend is not None:
            source = f"the {ENV_VAR} environment variable"
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        chosen = get_backend(backend, source="backend" if source == "backend=" else ENV_VAR)
        reasons = chosen.reasons(q, k, v)
        if reasons:
            raise BackendUnavailableError(
                f"backend {backend!r} (requested by {source}) cannot run this input:\n"
                + _format_reasons({backend: reasons})
                + f"\nq {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                f"{q.dtype} on {q.device}. Pass backend=None for automatic choice."
            )
        return chosen
    candidates = available_backends()
    for candidate in candidates.values():
        # not_automatic first: it is the cheap check that passes over e.g. Triton on CPU tensors at
        # every call, before the per-input reasons (~25 us of Python per call on a small CPU op)
        if not candidate.not_automatic(q, k, v) and not candidate.reasons(q, k, v):
            return candidate
    rejected = {name: c.reasons(q, k, v) or c.not_automatic(q, k, v) for name, c in candidates.items()}
    raise BackendUnavailableError(
        "no fastattn backend can run this input:\n" + _format_reasons(rejected)
    )


def backend_report() -> list[dict]:
    """For `python -m fastattn info`: each backend, whether it can run here, and why not."""
    rows = []
    for name, b in available_backends().items():
        why = b.unavailable()
        rows.append({"name": name, "priority": b.priority, "available": not why, "reasons": why})
    return rows

