"""The probe: before a layer is swapped, its original forward and fastattn's run side by side.

On small random inputs, on deep copies (residual scalar SWAP_PROBE_SCALAR, so the user's module
and its SN state are not touched), in eval mode and in training mode (each training-mode call
from the same fixed RNG state). A layer whose results differ is refused: structure cannot see
extra arithmetic inside a user's forward, such as a dropout applied only in training; the probe
can.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

from ..constants import SWAP_PROBE_SCALAR, SWAP_PROBE_SEED, SWAP_PROBE_SIZES, TOLERANCES
from ..testing import describe_mismatch
from .families import AttentionFamily
from .forward import run_family

__all__ = ["probe"]


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


def probe(module: nn.Module, family: AttentionFamily) -> str | None:
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
