"""`swap_attention(model)`: make the attention layers already inside a model run through fastattn.

The layers are found by structure (`fastattn.families`), never by importing the user's code, and
swapped Liger-style: only `forward` is replaced on the existing module *instance*. The convs,
their spectral norm (hooks, parametrizations, BigGAN's own `u0`/`sv0` power iteration), the
residual scalar and every state_dict key stay where they are; the swapped forward calls the
conv submodules themselves, so whatever runs inside them (SN updates in training, hooks) runs
exactly as before. `handle.revert()` removes the instance forward and the class's own forward
is back.

Before swapping, a probe runs the original forward and the swapped one on a small random input
(on deep copies, residual scalar 0.75, so the user's module and its SN state are not touched),
in eval mode and in training mode (each training-mode call from the same fixed RNG state), and
refuses the module if they differ: structure cannot see extra arithmetic inside a user's
forward, such as a dropout applied only in training; the probe can.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention_map import AttentionMap
from .constants import SWAP_PROBE_SCALAR, SWAP_PROBE_SEED, SWAP_PROBE_SIZES, TOLERANCES
from .dispatch import BackendUnavailableError, get_backend
from .families import AttentionFamily, forward_signature, match
from .nn import SelfAttention2d, attention_core
from .testing import describe_mismatch

__all__ = ["swap_attention", "SwapHandle", "SwappedLayer", "SkippedLayer", "run_family",
           "is_swapped"]

_STATE = "_fastattn_swap"


@dataclass
class _SwapState:
    family: AttentionFamily
    backend: str | None
    recorder: list | None = field(default=None, compare=False)


def run_family(module: nn.Module, family: AttentionFamily, x: Tensor, *, backend: str | None = None,
               want_map: bool = False) -> tuple[Tensor, AttentionMap | None]:
    """The family's layer computed with fastattn on `module`'s own submodules: (y, map or None)."""
    if not isinstance(x, Tensor) or x.dim() != 4 and not (family.conv_dim == 1 and x.dim() == 3):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, C, H, W) tensor for the {family.name} attention layer, got {got}")
    inp = x.reshape(x.shape[0], x.shape[1], -1) if family.conv_dim == 1 else x
    if family.pool_module:  # ceil-mode 2x2 pooling keeps >= 1 key on a size-1 side, floor none
        floor_pooled = not getattr(getattr(module, family.pool_module), "ceil_mode", False)
    else:
        floor_pooled = family.pool == "floor"
    if floor_pooled and min(x.shape[2:]) < 2:
        raise ValueError(f"the {family.name} attention layer max-pools keys 2x2 (rounding down), which "
                         f"leaves no key for an input of shape {tuple(x.shape)}: H and W must be >= 2")
    q = getattr(module, family.query)(inp)
    k = getattr(module, family.key)(inp)
    v = getattr(module, family.value)(inp)
    if family.pool_module:
        pool = getattr(module, family.pool_module)
        k, v = pool(k), pool(v)
    elif family.pool:
        ceil = family.pool == "ceil"
        k = F.max_pool2d(k, kernel_size=2, stride=2, ceil_mode=ceil)
        v = F.max_pool2d(v, kernel_size=2, stride=2, ceil_mode=ceil)
    key_hw = tuple(k.shape[2:]) if family.conv_dim == 2 else tuple(x.shape[2:])
    q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
    if family.roles_swapped:  # softmax over the query conv's pixels: the key conv asks
        q, k = k, q
    amap, scale = None, family.scale
    if want_map:
        out, lse = attention_core(q, k, v, scale=scale, backend=backend, return_lse=True)
        scale = scale if scale is not None else q.shape[1] ** -0.5
        amap = AttentionMap(q, k, lse, scale=scale, query_hw=tuple(x.shape[2:]), key_hw=key_hw)
    else:
        out = attention_core(q, k, v, scale=scale, backend=backend)
    out = out.view(*out.shape[:2], *x.shape[2:])
    if family.out:
        out = getattr(module, family.out)(out)
    y = getattr(module, family.scalar) * out + x
    for name in family.after_residual:
        y = getattr(module, name)(y)
    return y, amap


class _SwappedForward:
    """The `forward` fastattn puts on a swapped module instance (deep-copyable, picklable).

    A layer whose original returns (out, attention) gets (out, AttentionMap) back: the lazy map
    that never builds the (B, N, M) tensor. In a replica made by nn.DataParallel (`replica=True`)
    it returns (out, attention_map.materialize()) instead, the plain (B, N, M) tensor the
    original layer returned: DataParallel's gather only knows how to concatenate tensors (it
    rebuilds any other object with type(obj)(...), which an AttentionMap cannot be)."""

    def __init__(self, module: nn.Module, replica: bool = False):
        self.module = module
        self.replica = replica

    @property
    def __signature__(self) -> inspect.Signature:
        return forward_signature(self.module)

    def __call__(self, *args, **kwargs):
        module = self.module
        state: _SwapState = module.__dict__[_STATE]
        family = state.family
        if args and not kwargs and len(args) <= 1 + family.extra_forward_args:
            x = args[0]
        else:  # keyword call or a wrong call: let the original signature say what is wrong
            x = next(iter(forward_signature(module).bind(*args, **kwargs).arguments.values()))
        want_map = family.returns_attention or state.recorder is not None
        y, amap = run_family(module, family, x, backend=state.backend, want_map=want_map)
        if state.recorder is not None:
            state.recorder.append(amap)
        if not family.returns_attention:
            return y
        return (y, amap.materialize()) if getattr(self, "replica", False) else (y, amap)


class _SwappedReplicate:
    """nn.DataParallel copies a module's __dict__ into each replica, which would leave the
    replica's `forward` pointing at the original; this instance-level hook re-points it, and
    marks it as a replica's forward, which returns attention as a plain tensor (see
    _SwappedForward) so that DataParallel can gather it."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self):
        replica = type(self.module)._replicate_for_data_parallel(self.module)
        _install_forward(replica, replica.__dict__[_STATE], replica=True)
        return replica


def _install_forward(module: nn.Module, state: _SwapState, replica: bool = False) -> None:
    module.__dict__[_STATE] = state
    module.__dict__["forward"] = _SwappedForward(module, replica=replica)
    module.__dict__["_replicate_for_data_parallel"] = _SwappedReplicate(module)


def _uninstall_forward(module: nn.Module, state: _SwapState) -> bool:
    if module.__dict__.get(_STATE) is not state:
        return False
    del module.__dict__[_STATE]
    for name, kind in (("forward", _SwappedForward), ("_replicate_for_data_parallel", _SwappedReplicate)):
        if isinstance(module.__dict__.get(name), kind):
            del module.__dict__[name]
    return True


def _native_swap(module: SelfAttention2d, backend: str | None):
    """fastattn's own layer: switch a naive-mode SelfAttention2d to the fused path (and back)."""
    before = (module.attention, module.backend)
    module.attention, module.backend = "fastattn", backend

    def revert() -> bool:
        if (module.attention, module.backend) != ("fastattn", backend):
            return False
        module.attention, module.backend = before
        return True

    return revert


def is_swapped(module: nn.Module) -> bool:
    """Whether fastattn's forward is installed on this module instance."""
    return _STATE in module.__dict__ and isinstance(module.__dict__.get("forward"), _SwappedForward)


@dataclass(frozen=True)
class SwappedLayer:
    name: str  # qualified name in the model ("" for the model itself)
    family: str
    module_type: str


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    module_type: str
    reasons: dict  # family name -> list of reasons it is not that family

    def __str__(self) -> str:
        why = "; ".join(f"as {fam}: {', '.join(r)}" for fam, r in self.reasons.items())
        return f"{self.name or '<model>'} ({self.module_type}) not swapped: {why}"


class SwapHandle:
    """What `swap_attention` did. `swapped`, `skipped` (with reasons) and `already_swapped` list
    the layers; `revert()` restores them; usable as a context manager (reverts on exit)."""

    def __init__(self):
        self.swapped: list[SwappedLayer] = []
        self.skipped: list[SkippedLayer] = []
        self.already_swapped: list[SwappedLayer] = []
        self._installed: list[tuple[SwappedLayer, object]] = []  # (record, revert() -> bool)
        self._states: list[tuple[str, _SwapState]] = []

    def __repr__(self) -> str:
        return (f"SwapHandle(swapped={[(s.name, s.family) for s in self.swapped]}, "
                f"skipped={[s.name for s in self.skipped]}, "
                f"already_swapped={[s.name for s in self.already_swapped]})")

    def summary(self) -> str:
        lines = [f"swapped {s.name or '<model>'} ({s.module_type}) as {s.family}" for s in self.swapped]
        lines += [f"already swapped {s.name or '<model>'} as {s.family}" for s in self.already_swapped]
        lines += [str(s) for s in self.skipped]
        return "\n".join(lines) or "no attention layers found"

    def revert(self) -> list[str]:
        """Give the swapped modules their own forward back. Returns the names reverted."""
        reverted = [record.name for record, revert in self._installed if revert()]
        self._installed, self._states = [], []
        return reverted

    def __enter__(self) -> "SwapHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    @contextlib.contextmanager
    def recording(self):
        """Collect the attention of every swapped layer call: yields {name: [AttentionMap, ...]}.
        (fastattn's own SelfAttention2d layers are not recorded: use their attention_map(x).)"""
        maps: dict[str, list] = {}
        states = list(self._states)
        for name, state in states:
            state.recorder = maps.setdefault(name, [])
        try:
            yield maps
        finally:
            for _, state in states:
                state.recorder = None


def _deepcopy_detached(module: nn.Module) -> nn.Module:
    """copy.deepcopy(module), with every non-leaf tensor held as a module attribute copied
    detached. torch's hook-style spectral norm (torch.nn.utils.spectral_norm) leaves its
    computed `weight` on the conv as a plain attribute; after a forward with grad enabled that
    is a non-leaf tensor, which deepcopy refuses. The hook recomputes it from `weight_orig` on
    the next forward, so a detached copy of its value is a faithful copy."""
    memo: dict = {}
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


@contextlib.contextmanager
def _fixed_rng(device: torch.device):
    """Run the block from RNG state SWAP_PROBE_SEED (CPU and `device`'s generator), then give the
    caller's RNG state back: the training-mode probe runs the original and fastattn's forward
    from the same state, so a random op in the original (a dropout) shows up as a difference
    and the caller's random stream is not advanced."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(SWAP_PROBE_SEED)
            yield
        return
    device_mod = torch.get_device_module(device.type)
    index = device.index if device.index is not None else device_mod.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(SWAP_PROBE_SEED)
        with device_mod.device(index):
            device_mod.manual_seed(SWAP_PROBE_SEED)
        yield


def _mismatch(family: AttentionFamily, x: Tensor, want, got: Tensor, amap, tol: dict,
              training: bool) -> str | None:
    """Why the original's result `want` is not fastattn's (`got`, `amap`) on probe input x, or None."""
    pairs = [("output", got, want)]
    if family.returns_attention:
        if not (isinstance(want, tuple) and len(want) == 2 and isinstance(want[1], Tensor)
                and tuple(want[1].shape) == tuple(amap.shape)):
            return f"its forward does not return (out, attention of shape {tuple(amap.shape)})"
        pairs = [("output", got, want[0]), ("attention", amap.materialize(), want[1])]
    elif not isinstance(want, Tensor):
        return f"its forward returns {type(want).__name__}, the {family.name} layer returns a tensor"
    for what, a, b in pairs:
        if a.shape != b.shape:
            detail = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        elif torch.isclose(a, b, **tol).all():
            continue
        else:
            detail = describe_mismatch(a, b, tol["atol"], tol["rtol"], what)
        if training:
            if a.shape == b.shape:
                detail = f"max difference {(a.double() - b.double()).abs().max().item():.3g}; {detail}"
            return (f"its training-mode forward differs from the {family.name} layer's on a probe input "
                    f"of shape {tuple(x.shape)} ({detail}), while its "
                    f"eval-mode forward matches: it does something in training that fastattn's "
                    "does not, e.g. dropout; describe the variant with fastattn.register_adapter "
                    "or leave it unswapped")
        return (f"its forward computes something other than the {family.name} layer on a probe "
                f"input of shape {tuple(x.shape)} ({detail}); it may do extra work inside "
                "forward: describe the variant with fastattn.register_adapter")
    return None


def _probe(module: nn.Module, family: AttentionFamily) -> str | None:
    """None when the original forward and fastattn's agree on small random inputs, else why not.

    Eval mode on one deep copy; then training mode on two more deep copies, one running the
    original forward and one fastattn's, each call from the same fixed RNG state: spectral-norm
    power iterations (which run only in training) advance identically on both, and arithmetic
    the original does only in training (a dropout) shows up as a difference. The user's module,
    its SN state and the caller's RNG state are not touched."""
    scalar = getattr(module, family.scalar)
    if scalar.device.type == "meta":
        return None
    try:
        twin = _deepcopy_detached(module)
        train_original, train_fast = _deepcopy_detached(module), _deepcopy_detached(module)
    except Exception as error:  # noqa: BLE001 - any failure means we cannot check
        return f"could not be copied to verify it ({type(error).__name__}: {error}); pass verify=False to swap unchecked"
    twin.eval()
    train_original.train()
    train_fast.train()
    with torch.no_grad():
        for copy_ in (twin, train_original, train_fast):
            getattr(copy_, family.scalar).fill_(SWAP_PROBE_SCALAR)
    channels = getattr(twin, family.query).in_channels
    generator = torch.Generator().manual_seed(0)
    tol = TOLERANCES.get(scalar.dtype, TOLERANCES[torch.float32])
    train_copies_in_step = True  # False once the original raised part-way on the training copies
    for attempt, (height, width) in enumerate(SWAP_PROBE_SIZES):
        x = torch.randn(2, channels, height, width, generator=generator, dtype=torch.float64)
        x = x.to(scalar.device, scalar.dtype)
        with torch.no_grad(), torch.autocast(scalar.device.type, enabled=False):
            try:
                want = type(twin).forward(twin, x)
            except Exception as error:  # noqa: BLE001
                if attempt == 0:
                    return (f"its forward raised {type(error).__name__} on a probe input of shape "
                            f"{tuple(x.shape)}: {error}")
                continue  # odd sizes: many originals reshape with h*w//4 and crash
            got, amap = run_family(twin, family, x, backend="torch", want_map=family.returns_attention)
        failure = _mismatch(family, x, want, got, amap, tol, training=False)
        if failure:
            return failure
        if not train_copies_in_step:
            continue
        with torch.no_grad(), torch.autocast(scalar.device.type, enabled=False):
            try:
                with _fixed_rng(scalar.device):
                    want = type(train_original).forward(train_original, x)
            except Exception as error:  # noqa: BLE001
                if attempt == 0:
                    return (f"its training-mode forward raised {type(error).__name__} on a probe input "
                            f"of shape {tuple(x.shape)}: {error}")
                train_copies_in_step = False  # its SN state may have advanced part-way: stop here
                continue
            with _fixed_rng(scalar.device):
                got, amap = run_family(train_fast, family, x, backend="torch",
                                       want_map=family.returns_attention)
        failure = _mismatch(family, x, want, got, amap, tol, training=True)
        if failure:
            return failure
    return None


def _check_backend(backend) -> None:
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    reasons = get_backend(backend).unavailable()
    if reasons:
        raise BackendUnavailableError(f"backend {backend!r} (requested by backend=) cannot run here: "
                                      f"{'; '.join(reasons)}. Pass backend=None for automatic choice.")


class _Unset:
    def __repr__(self) -> str:
        return "None"


_UNSET = _Unset()  # backend= not passed


def swap_attention(model: nn.Module, *, backend: str | None = _UNSET, strict: bool = False,
                   verify: bool = True) -> SwapHandle:
    """Make every recognised attention layer in `model` run through fastattn, in place.

    backend: the fastattn backend for the swapped layers (None, the default = automatic per
        call); a named backend that cannot run here raises now. fastattn's own SelfAttention2d
        layers already in attention="fastattn" mode count as already swapped and keep their
        backend, unless backend= is passed explicitly and differs from theirs.
    strict: raise LookupError when no attention layer was swapped (listing near misses).
    verify: run the probe (see module docstring) before swapping each layer.
    Layers that only partly match a family are left alone and listed in `handle.skipped` with
    the reasons (a UserWarning says so too). Swapping an already swapped model changes nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("strict", strict), ("verify", verify)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    backend_given = backend is not _UNSET
    backend = backend if backend_given else None
    _check_backend(backend)
    handle = SwapHandle()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, SelfAttention2d):
            if module.attention == "fastattn" and (not backend_given or module.backend == backend):
                handle.already_swapped.append(SwappedLayer(name, "fastattn", kind))
            else:
                record = SwappedLayer(name, "fastattn", kind)
                handle.swapped.append(record)
                handle._installed.append((record, _native_swap(module, backend)))
            continue
        if _STATE in module.__dict__:
            handle.already_swapped.append(SwappedLayer(name, module.__dict__[_STATE].family.name, kind))
            continue
        matches = match(module)
        if not matches:
            continue
        reasons = {m.family.name: list(m.reasons) for m in matches}
        chosen = None
        for candidate in (m for m in matches if m.ok):
            if "forward" in module.__dict__ or "_replicate_for_data_parallel" in module.__dict__:
                reasons[candidate.family.name] = ["its forward is already replaced on this instance by other code"]
                continue
            failure = _probe(module, candidate.family) if verify else None
            if failure:
                reasons[candidate.family.name] = [failure]
                continue
            chosen = candidate.family
            break
        if chosen is None:
            handle.skipped.append(SkippedLayer(name, kind, reasons))
            continue
        state = _SwapState(chosen, backend)
        _install_forward(module, state)
        record = SwappedLayer(name, chosen.name, kind)
        handle.swapped.append(record)
        handle._installed.append((record, lambda module=module, state=state: _uninstall_forward(module, state)))
        handle._states.append((name, state))
    if strict and not handle.swapped and not handle.already_swapped:
        raise LookupError("swap_attention(strict=True) found no attention layer to swap in "
                          f"{type(model).__name__}" + (":\n" + handle.summary() if handle.skipped else
                                                       " (no module has the structure of a known family)"))
    if handle.skipped:
        warnings.warn("fastattn.swap_attention left attention-like layers unswapped:\n"
                      + "\n".join(str(s) for s in handle.skipped), UserWarning, stacklevel=2)
    return handle
