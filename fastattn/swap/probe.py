"""The probe: before a layer is swapped, its original forward and fastattn's run side by side.

On small random inputs, in eval mode and in training mode, every call on its own fresh deep copy
(residual scalars that are 0 set to SWAP_PROBE_SCALAR), each from the same fixed RNG state: a
spectral norm that updates its state on every call (a hand-written pre-hook SN does, in eval mode
too) advances alike on both sides, and the user's module, its SN state and the caller's RNG state
are not touched. Every extra forward argument gets a probe value the original accepts (a random
tensor shaped like x, (B, C), class labels or (B,)); an argument the forward never reads gets a
value that raises on any use, and a forward that reads an argument it accepts no probe value for
cannot be verified, so it is not swapped. A layer whose results differ is refused: structure
cannot see extra arithmetic inside a user's forward, such as a dropout applied only in training;
the probe can.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math

import torch
from torch import Tensor, nn

from ..constants import SWAP_PROBE_SCALAR, SWAP_PROBE_SEED, SWAP_PROBE_SIZES, TOLERANCES
from ..accuracy import describe_mismatch
from torch.utils import _pytree as pytree

from .capture import AttentionCapture, analyse
from .families import AttentionFamily, forward_signature
from .forward import run_family

__all__ = ["probe", "capture_and_probe", "deepcopy_detached"]


def deepcopy_detached(module: nn.Module) -> nn.Module:
    """copy.deepcopy(module), with every non-leaf tensor held as a module attribute copied
    detached. torch's hook-style spectral norm (torch.nn.utils.spectral_norm) leaves its
    computed `weight` on the conv as a plain attribute; after a forward with grad enabled that
    is a non-leaf tensor, which deepcopy refuses. The hook recomputes it from `weight_orig` on
    the next forward, so a detached copy of its value is a faithful copy."""
    memo: dict = {}
    for sub in module.modules():  # a hand-written SN may also keep its computed weight as a buffer
        for value in [*vars(sub).values(), *sub._buffers.values()]:
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



class _Unread:
    """The probe value of an argument the forward must not read: any use raises."""

    def __getattr__(self, name):
        raise AttributeError(f"the probe's placeholder for an unused argument has no {name!r}")

    def __repr__(self) -> str:
        return "<unused argument>"


def _zero_scalars_set(module: nn.Module) -> nn.Module:
    """Residual scalars start at 0 (the layer is then the identity and the core is invisible):
    every one-element parameter of the layer itself that is 0 gets SWAP_PROBE_SCALAR."""
    with torch.no_grad():
        for param in module.parameters(recurse=False):
            if param.numel() == 1 and param.is_floating_point() and not param.any():
                param.fill_(SWAP_PROBE_SCALAR)
    return module


def _fresh(module: nn.Module, training: bool, scalar: str | None = None) -> nn.Module:
    copy_ = deepcopy_detached(module)
    if scalar is not None:
        with torch.no_grad():
            getattr(copy_, scalar).fill_(SWAP_PROBE_SCALAR)
    else:
        _zero_scalars_set(copy_)
    return copy_.train(training)


def _call(fn, device, *args, **kwargs):
    with torch.no_grad(), torch.autocast(device.type, enabled=False), _fixed_rng(device):
        return fn(*args, **kwargs)


def probe_arguments(module: nn.Module, x: Tensor, scalar: str | None = None):
    """(args, kwargs) of probe values for the forward's arguments after x, or a reason string."""
    try:
        params = list(forward_signature(module).parameters.values())[1:]
    except (TypeError, ValueError) as error:
        return f"its forward signature cannot be read ({error})"
    kinds = inspect.Parameter
    params = [p for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
    if not params:
        return [], {}
    batch, channels = x.shape[:2]
    generator = torch.Generator().manual_seed(1)
    candidates = [
        lambda: torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device, x.dtype),
        lambda: torch.randn(batch, channels, generator=generator, dtype=torch.float64).to(x.device, x.dtype),
        lambda: torch.randint(0, 2, (batch,), generator=generator).to(x.device),
        lambda: torch.randn(batch, generator=generator, dtype=torch.float64).to(x.device, x.dtype),
        lambda: _Unread(),
    ]
    for make in candidates:
        args, kwargs = [], {}
        for p in params:
            (kwargs.__setitem__(p.name, make()) if p.kind == kinds.KEYWORD_ONLY else args.append(make()))
        twin = _fresh(module, False, scalar)
        try:
            _call(type(twin).forward, x.device, twin, x, *args, **kwargs)
        except Exception:  # noqa: BLE001 - the next candidate
            continue
        return args, kwargs
    names = ", ".join(repr(p.name) for p in params)
    return (f"its forward uses its argument{'s' if len(params) > 1 else ''} {names}, and accepts "
            "none of the probe's values for it (a random tensor shaped like x, (B, C), class labels "
            "(B,), (B,)), so it cannot be verified; swap it by hand or with verify=False")


def _compare(want, got, tol: dict) -> tuple[str | None, float]:
    """(why the outputs differ or None, the largest difference)."""
    want_leaves, want_spec = pytree.tree_flatten(want)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if want_spec != got_spec:
        return f"it returns {want_spec}, fastattn's forward {got_spec}", math.inf
    worst = 0.0
    for i, (a, b) in enumerate(zip(got_leaves, want_leaves)):
        what = "output" if len(want_leaves) == 1 else f"output {i}"
        if not isinstance(b, Tensor):
            if a != b:
                return f"{what} is {b!r}, fastattn's {a!r}", math.inf
            continue
        if not isinstance(a, Tensor) or a.shape != b.shape:
            return f"{what}: shape {tuple(b.shape)} vs {tuple(getattr(a, 'shape', ()))}", math.inf
        if a.numel():
            worst = max(worst, (a.double() - b.double()).abs().max().item())
        if not torch.isclose(a, b, **tol).all():
            return describe_mismatch(a, b, tol["atol"], tol["rtol"], what), worst
    return None, worst


def probe(module: nn.Module, family: AttentionFamily) -> tuple[str | None, float | None]:
    """(None, max error) when the original forward and the family's agree on small random inputs
    in eval and training mode, else (why not, None). Every call on a fresh deep copy."""
    scalar = getattr(module, family.scalar)
    if scalar.device.type == "meta":
        return None, None
    try:
        deepcopy_detached(module)
    except Exception as error:  # noqa: BLE001 - any failure means we cannot check
        return (f"could not be copied to verify it ({type(error).__name__}: {error}); pass "
                "verify=False to swap unchecked"), None
    channels = getattr(module, family.query).in_channels
    generator = torch.Generator().manual_seed(0)
    tol = TOLERANCES.get(scalar.dtype, TOLERANCES[torch.float32])
    extra, worst = None, 0.0
    for attempt, (height, width) in enumerate(SWAP_PROBE_SIZES):
        x = torch.randn(2, channels, height, width, generator=generator, dtype=torch.float64)
        x = x.to(scalar.device, scalar.dtype)
        if extra is None:
            extra = probe_arguments(module, x, family.scalar)
            if isinstance(extra, str):
                return extra, None
        args, kwargs = extra
        for training in (False, True):
            mode = "training-mode " if training else ""
            original, fast = _fresh(module, training, family.scalar), _fresh(module, training, family.scalar)
            try:
                want = _call(type(original).forward, x.device, original, x, *args, **kwargs)
            except Exception as error:  # noqa: BLE001
                if attempt == 0:
                    return (f"its {mode}forward raised {type(error).__name__} on a probe input of "
                            f"shape {tuple(x.shape)}: {error}"), None
                break  # odd sizes: many originals reshape with h*w//4 and crash
            got, amap = _call(run_family, x.device, fast, family, x, backend="torch",
                              want_map=family.returns_attention)
            failure = _mismatch(family, x, want, got, amap, tol, training)
            if failure:
                return failure, None
            _, err = _compare(want[0] if family.returns_attention else want, got, tol)
            worst = max(worst, err)
    return None, worst


def _input_channels(module: nn.Module) -> int | None:
    for sub in module.modules():
        if sub is module:
            continue
        for attr in ("num_channels", "num_features", "in_channels", "in_features"):
            value = getattr(sub, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    for param in module.parameters(recurse=False):
        if param.dim() == 2:
            return param.shape[0]
    return None


def capture_and_probe(module: nn.Module, backend: str | None = None):
    """Find the attention core of `module` by what its forward computes and verify fastattn's run of
    it. Returns (cores {training: call indices}, pattern line, max error, reasons): cores is None
    when the layer cannot be swapped, with the reasons."""
    channels = _input_channels(module)
    if channels is None:
        return None, "", None, ["cannot tell its input channels (no conv, linear or norm inside)"]
    ref = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    if device.type == "meta":
        return None, "", None, ["its parameters are on the meta device: nothing to run"]
    try:
        deepcopy_detached(module)
    except Exception as error:  # noqa: BLE001
        return None, "", None, [f"could not be copied to trace it ({type(error).__name__}: {error})"]
    tol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    generator = torch.Generator().manual_seed(0)
    cores, pattern, extra, worst, flat = {}, "", None, 0.0, False
    for attempt, (height, width) in enumerate(SWAP_PROBE_SIZES):
        x = torch.randn(2, channels, height, width, generator=generator, dtype=torch.float64)
        x = x.to(device, dtype)
        if flat:
            x = x.flatten(2)
        if attempt == 0:
            extra = probe_arguments(module, x)
            if isinstance(extra, str) and not flat:
                extra2 = probe_arguments(module, x.flatten(2))
                if not isinstance(extra2, str):
                    extra, flat, x = extra2, True, x.flatten(2)
            if isinstance(extra, str):
                reason = extra if "argument" in extra else None
                return None, "", None, [reason or "its forward could not be traced on a probe "
                                        f"input of shape {tuple(x.shape)}: it raised"]
            for training in (False, True):
                twin = _fresh(module, training)
                try:
                    found, line, reasons = _call(
                        analyse, device, lambda: type(twin).forward(twin, x, *extra[0], **extra[1]),
                        x.shape[0], x[0, 0].numel())
                except Exception as error:  # noqa: BLE001
                    return None, "", None, [f"its forward could not be traced: {type(error).__name__}: {error}"]
                if found is None:
                    return None, line, None, reasons
                cores[training], pattern = found, pattern or line
        args, kwargs = extra
        for training in (False, True):
            original, fast = _fresh(module, training), _fresh(module, training)
            try:
                want = _call(type(original).forward, device, original, x, *args, **kwargs)
            except Exception as error:  # noqa: BLE001
                if attempt == 0:
                    return None, pattern, None, [f"its forward raised {type(error).__name__}: {error}"]
                break
            mode = AttentionCapture(cores[training], backend="torch")

            def run():
                with mode:
                    out = type(fast).forward(fast, x, *args, **kwargs)
                return mode.finish(out)[0]

            got = _call(run, device)
            which = "training-mode " if training else ""
            if mode.misses or not mode.hits:
                return None, pattern, None, [f"its {which}forward did not reach the attention core "
                                             "found at swap time on another input size"]
            logit_uses = [op for op, stage in mode.materialised if stage != "attention"]
            if logit_uses:
                return None, pattern, None, [f"its {which}forward needs the logits themselves "
                                             f"({', '.join(dict.fromkeys(logit_uses))})"]
            failure, err = _compare(want, got, TOLERANCES.get(mode.narrowest or dtype, tol))
            if failure:
                return None, pattern, None, [f"its {which}forward differs from fastattn's on a probe "
                                             f"input of shape {tuple(x.shape)} ({failure})"]
            worst = max(worst, err)
    return cores, pattern, worst, []
