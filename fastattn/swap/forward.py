"""The forward fastattn installs on a swapped module instance, and how it is installed and removed.

Only `forward` is replaced on the existing module *instance* (Liger-style): the convs, their
spectral norm (hooks, parametrizations, BigGAN's own `u0`/`sv0` power iteration), the residual
scalar and every state_dict key stay where they are; the swapped forward calls the conv
submodules themselves, so whatever runs inside them runs exactly as before. Removing the
instance attribute gives the class's own forward back.
"""
from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import constants
from ..attention_map import AttentionMap
from ..backends.torch_chunked import matrix_bytes
from ..dispatch import env_backend
from ..nn import attention_core
from ..reference import accumulation_dtype, default_scale
from .capture import AttentionCapture, warn_miss
from .families import AttentionFamily, forward_signature
from .torch_calls import call_arguments

__all__ = ["run_family", "run_traced", "is_swapped", "install_forward", "uninstall_forward", "SwapState",
           "STATE", "ThreadRecorder", "always_capture", "direct_is_faster"]

STATE = "_fastattn_swap"
# the instance attributes install_forward sets besides STATE (see install_forward)
_INSTANCE_HOOKS = ("forward", "_replicate_for_data_parallel", "__prepare_scriptable__")


class ThreadRecorder:
    """Where a swapped layer's attention maps go while `handle.recording()` is open: into the
    list of the thread that opened it (one list per thread that has it open), nowhere for calls
    from other threads. A deep copy or pickle of a module that is recording does not record."""

    def __init__(self):
        self.lists: dict[int, list] = {}  # threading.get_ident() -> that thread's list

    def active(self) -> bool:
        """Whether the calling thread is recording."""
        return threading.get_ident() in self.lists

    def append(self, amap) -> None:
        target = self.lists.get(threading.get_ident())
        if target is not None:
            target.append(amap)

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


@dataclass
class SwapState:
    family: AttentionFamily | None  # None: captured by computation ("traced")
    backend: str | None
    recorder: ThreadRecorder | None = field(default=None, compare=False)  # while a thread records
    cores: dict | None = None  # traced: {training: positions of the core calls} (capture.py)
    # traced: call signature -> whether calls of it run the class's forward as written (direct)
    direct: dict = field(default_factory=dict, compare=False, repr=False)
    pattern: str = ""
    layer: str = ""  # qualified name in the model it was swapped in, for messages

    @property
    def name(self) -> str:
        return self.family.name if self.family is not None else "traced"


_JIT_REFUSAL = (
    "{what} cannot take the attention layer {layer} ({kind}) that fastattn.swap_attention swapped: "
    "its forward is a Python callable set on the instance, which TorchScript can neither compile "
    "nor trace faithfully (fastattn picks its backend per call). To compile the swapped model, "
    "use torch.compile(model); to script or trace the original layers, call fastattn.unswap(model) first."
)


def _refuse_jit(module: nn.Module, what: str):
    state = module.__dict__.get(STATE)
    layer = repr(state.layer or "<model>") if state is not None else "<unknown>"
    raise TypeError(_JIT_REFUSAL.format(what=what, layer=layer, kind=type(module).__name__))


_DIRECT_SIGNATURES_MAX = 64
_ALWAYS_CAPTURE = threading.local()


@contextmanager
def always_capture():
    """Within it (this thread), captured layers run their core through fastattn at every size:
    what fastattn.verify checks, so that a small example input still exercises fastattn's core."""
    depth = getattr(_ALWAYS_CAPTURE, "depth", 0)
    _ALWAYS_CAPTURE.depth = depth + 1
    try:
        yield
    finally:
        _ALWAYS_CAPTURE.depth = depth


def _call_signature(training: bool, args, kwargs):
    """What decides a captured layer's core sizes and fastattn's path for a call: shapes, dtypes
    and devices of the tensor arguments, the other arguments' values, training and grad mode.
    None when an argument is of a kind not keyed here (then the call is always captured)."""
    parts = [training, torch.is_grad_enabled(), tuple(kwargs)]
    for value in call_arguments(args, kwargs):
        if isinstance(value, Tensor):
            parts.append((value.shape, value.dtype, value.device, value.requires_grad))
        elif value is None or type(value) in (bool, int, float, str):
            parts.append(value)
        else:
            return None
    return tuple(parts)


def direct_is_faster(core_shapes: list, backend: str | None, grad: bool = False, map_made: bool = False) -> bool:
    """Whether calls like these run faster as the class's own forward than captured: every core
    on the CPU, the backend automatic, and its (B', N, M) matrix within SWAP_DIRECT_MAX_BYTES
    (SWAP_DIRECT_MAX_BYTES_GRAD when autograd records the call, `grad`), where fastattn's torch
    backend computes the naive arithmetic itself (kept probabilities) and capturing costs more
    per call than it saves (constants.py has the measurements). A forward that makes its
    attention map real anyway (`map_made`: it returns the map, or averages it over heads, ...)
    computed it twice when captured: without a graph such calls run as written at any size."""
    if backend is not None or env_backend() is not None or not core_shapes:
        return False
    budget = constants.SWAP_DIRECT_MAX_BYTES_GRAD if grad else constants.SWAP_DIRECT_MAX_BYTES
    if map_made and not grad:
        budget = None
    for batch, n_queries, n_keys, dtype, device_type in core_shapes:
        if device_type != "cpu":
            return False
        if budget is not None and matrix_bytes(batch, n_queries, n_keys, accumulation_dtype(dtype))[1] > budget:
            return False
    return True


def run_traced(module: nn.Module, state: SwapState, args, kwargs):
    """The user's own forward, with only the attention core found at swap time run by fastattn;
    calls too small for that to pay (direct_is_faster, decided on a signature's first call) run
    the forward as written."""
    recorder = state.recorder if state.recorder is not None and state.recorder.active() else None
    signature = None
    if recorder is None and not torch.compiler.is_compiling() and not getattr(_ALWAYS_CAPTURE, "depth", 0):
        signature = _call_signature(module.training, args, kwargs)
        if signature is not None and state.direct.get(signature):
            return type(module).forward(module, *args, **kwargs)
    mode = AttentionCapture(state.cores.get(module.training), backend=state.backend,
                            recorder=recorder)
    with mode:
        output = type(module).forward(module, *args, **kwargs)
    output, returned = mode.finish(output)
    if mode.misses:
        warn_miss(type(module).__name__, mode.misses)
    elif signature is not None:
        if len(state.direct) >= _DIRECT_SIGNATURES_MAX:
            state.direct.clear()
        state.direct[signature] = direct_is_faster(mode.core_shapes, state.backend, torch.is_grad_enabled(),
                                                   map_made=bool(returned or mode.materialised))
    return output


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
        scale = scale if scale is not None else default_scale(q.shape[1])
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
        if not torch.compiler.is_compiling() and torch.jit.is_tracing():
            _refuse_jit(module, "torch.jit.trace")
        state: SwapState = module.__dict__[STATE]
        family = state.family
        if family is None:
            return run_traced(module, state, args, kwargs)
        if args and not kwargs and len(args) <= 1 + family.extra_forward_args:
            x = args[0]
        else:  # keyword call or a wrong call: let the original signature say what is wrong
            x = next(iter(forward_signature(module).bind(*args, **kwargs).arguments.values()))
        recording = state.recorder is not None and state.recorder.active()
        want_map = family.returns_attention or recording
        y, amap = run_family(module, family, x, backend=state.backend, want_map=want_map)
        if recording:
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
        install_forward(replica, replica.__dict__[STATE], replica=True)
        return replica


class _RefuseScript:
    """torch.jit.script calls `__prepare_scriptable__()` on every submodule before it compiles
    anything; on a swapped instance this raises the TypeError that says what to do instead,
    where TorchScript itself would fail with an AttributeError about the forward object."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self):
        _refuse_jit(self.module, "torch.jit.script")


def install_forward(module: nn.Module, state: SwapState, replica: bool = False) -> None:
    """Put fastattn's forward on the instance. Everything set here is a plain instance attribute
    (copied by deepcopy, pickle and DataParallel's replicate; not in the state_dict)."""
    module.__dict__[STATE] = state
    module.__dict__["forward"] = _SwappedForward(module, replica=replica)
    module.__dict__["_replicate_for_data_parallel"] = _SwappedReplicate(module)
    module.__dict__["__prepare_scriptable__"] = _RefuseScript(module)


def uninstall_forward(module: nn.Module, state: SwapState | None = None) -> bool:
    """Give the module its class's forward back; with `state`, only if that swap is the one
    installed (a handle reverts only its own swaps). Returns whether it was swapped."""
    if STATE not in module.__dict__ or state is not None and module.__dict__[STATE] is not state:
        return False
    del module.__dict__[STATE]
    for name, kind in zip(_INSTANCE_HOOKS, (_SwappedForward, _SwappedReplicate, _RefuseScript)):
        if isinstance(module.__dict__.get(name), kind):
            del module.__dict__[name]
    return True


def is_swapped(module: nn.Module) -> bool:
    """Whether fastattn's forward is installed on this module instance."""
    return STATE in module.__dict__ and isinstance(module.__dict__.get("forward"), _SwappedForward)
