"""`fastattn.verify(model, example_inputs)`: is the swapped model still the model?

Two deep copies of `model` are made: the swapped one (`swap_attention` on a copy; layers the
model already had swapped stay swapped) and the original one (a copy with fastattn's forwards
removed, and fastattn's own SelfAttention2d layers set to their naive math). Every run then
starts from a fresh deep copy of one of them, cast to the run's dtype, so stateful modules
(spectral norms that update on every call, batch-norm statistics) start from the same state on
both sides, and from the same RNG seed (VERIFY_SEED), so a dropout draws the same mask.

Per dtype and mode (eval, train), three runs: the original in float64 (the reference), the
original in the dtype, the swapped model in the dtype (in float64 the original is the
reference). Each run records the model's outputs, the gradients of a fixed random projection of
the outputs with respect to the floating-point inputs and every parameter (and, with
double_backward, the parameters' gradients of the squared norm of the input gradients), and,
per swapped layer by qualified name, through hooks: the layer's outputs, the gradient reaching
its input x, and the gradients of the parameters under its name. Timing and peak memory reuse
`fastattn bench`'s measurement functions (fastattn.bench.measure).
"""
from __future__ import annotations

import contextlib
import copy
import math
import platform
import warnings

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..accuracy import error_bound, max_abs_error
from ..attention_map import AttentionMap
from ..constants import (ERROR_FLOOR, ERROR_RATIO_GRAD, ERROR_RATIO_OUT, VERIFY_MAX_REPEATS, VERIFY_MIN_REPEATS,
                         VERIFY_MIN_TIME_S, VERIFY_SEED)
from ..dispatch import check_backend_name
from ..nn import SelfAttention2d
from ..swap import swap_attention, unswap
from ..swap.forward import always_capture
from ..swap.probe import deepcopy_detached
from .report import Check, LayerReport, TimingRow, VerifyReport

__all__ = ["verify", "VerifyUsageError", "DTYPE_NAMES"]

DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}
_ALIASES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
            "double": "float64", "float": "float32", "half": "float16"}


class VerifyUsageError(ValueError):
    """The model or its example inputs cannot be verified as given (the model does not run on them,
    a dtype name is unknown ...): a usage problem, not a failed check."""


def _dtype_name(value) -> str:
    if isinstance(value, torch.dtype):
        for name, dtype in DTYPE_NAMES.items():
            if dtype == value:
                return name
    elif isinstance(value, str) and _ALIASES.get(value, value) in DTYPE_NAMES:
        return _ALIASES.get(value, value)
    raise VerifyUsageError(f"dtypes must name floating-point dtypes among {list(DTYPE_NAMES)}, got {value!r}")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Run the block from RNG state `seed` (CPU and the model's device), then give the caller's back."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _example_args(example_inputs, device: torch.device, seed: int) -> tuple:
    if callable(example_inputs) and not isinstance(example_inputs, (Tensor, nn.Module)):
        with _seeded(device, seed):
            try:
                example_inputs = example_inputs()
            except Exception as error:
                raise VerifyUsageError(f"example_inputs() raised {type(error).__name__}: {error}") from error
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise VerifyUsageError("example_inputs must be a tensor, a tuple of positional arguments or a "
                               f"callable returning one, got {type(example_inputs).__name__}")
    return pytree.tree_map(lambda t: t.detach().to(device) if isinstance(t, Tensor) else t, example_inputs)


# --- the two models ------------------------------------------------------------------------------

def _match(family: str) -> str:
    return {"traced": "traced", "fastattn": "native"}.get(family, "family")


def _prepare(model: nn.Module, backend: str | None, probe: bool):
    """(original, swapped, layer reports, unswapped lines): two copies of `model`."""
    try:
        swapped = deepcopy_detached(model)
    except Exception as error:
        raise VerifyUsageError(f"the model cannot be deep-copied ({type(error).__name__}: {error}); "
                               "fastattn.verify runs copies and leaves your model as it is") from error
    original = deepcopy_detached(model)
    kwargs = {} if backend is None else {"backend": backend}
    with warnings.catch_warnings():  # the layers it leaves alone are in the report
        warnings.simplefilter("ignore", UserWarning)
        handle = swap_attention(swapped, verify=probe, **kwargs)
    unswap(original)  # the original: the model's own math everywhere
    for module in original.modules():
        if isinstance(module, SelfAttention2d) and module.attention == "fastattn":
            module.attention, module.backend = "naive", None
    layers = []
    for record in [*handle.swapped, *handle.already_swapped]:
        layer = LayerReport(record.name, record.module_type, _match(record.family), record.family,
                            record.pattern, record.max_error)
        module = swapped.get_submodule(record.name)
        zeros = [name for name, p in module.named_parameters(recurse=False)
                 if p.numel() == 1 and p.is_floating_point() and not p.detach().any()]
        if zeros:
            layer.notes.append(f"its residual scalar {zeros[0]!r} is 0, so its output equals its input: "
                               "only the gradients of its parameters see its attention")
        layers.append(layer)
    unswapped = [str(s) for s in handle.skipped]
    return original, swapped, layers, unswapped


# --- one run -------------------------------------------------------------------------------------

def _tensors(value) -> list[Tensor]:
    """The floating-point tensors in an output (an AttentionMap counts as its (B, N, M) tensor)."""
    leaves = pytree.tree_leaves(value, is_leaf=lambda v: isinstance(v, AttentionMap))
    leaves = [v.materialize() if isinstance(v, AttentionMap) else v for v in leaves]
    return [v for v in leaves if isinstance(v, Tensor) and v.is_floating_point()]


class _Run:
    """What one run recorded, everything detached."""

    def __init__(self):
        self.outputs: list[Tensor] = []
        self.input_grads: list[Tensor | None] = []
        self.param_grads: dict[str, Tensor | None] = {}
        self.param_grads2: dict[str, Tensor | None] = {}
        self.layer_outputs: dict[str, list[Tensor]] = {}
        self.layer_input_grads: dict[str, dict[int, Tensor]] = {}


def _cotangents(outputs: list[Tensor], seed: int) -> list[Tensor]:
    """Fixed random output gradients, made in fp64 on the CPU so every dtype and device gets the
    same values (cast)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outputs]


def _floating_inputs(args: tuple, dtype: torch.dtype, requires_grad: bool) -> tuple[tuple, list[Tensor]]:
    """args with each floating tensor a detached copy in `dtype` (requires_grad_ on it must not
    change the caller's tensor), and those copies when they require grad."""
    inputs = pytree.tree_map(
        lambda t: t.detach().to(dtype).requires_grad_(requires_grad) if isinstance(t, Tensor) and t.is_floating_point()
        else t, args)
    return inputs, [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor) and t.requires_grad]


def _run(source: nn.Module, args: tuple, dtype: torch.dtype, training: bool, layer_names: list[str],
         backward: bool, double: bool, seed: int, device: torch.device) -> _Run:
    model = deepcopy_detached(source).to(dtype).train(training)
    inputs, grad_inputs = _floating_inputs(args, dtype, backward)
    result, capturing, handles = _Run(), [True], []

    for name in layer_names:
        module = model.get_submodule(name)
        outs, grads = result.layer_outputs.setdefault(name, []), result.layer_input_grads.setdefault(name, {})

        def pre_hook(_module, hook_args, hook_kwargs, grads=grads, outs=outs):
            x = hook_args[0] if hook_args else next(iter(hook_kwargs.values()), None)
            if isinstance(x, Tensor) and x.requires_grad:
                call = len(outs)

                def keep(grad, call=call):  # returns None: the gradient flows on unchanged
                    if capturing[0]:
                        grads.setdefault(call, grad.detach().clone())
                x.register_hook(keep)

        def hook(_module, _args, output, outs=outs):
            outs.extend(t.detach().clone() for t in _tensors(output))

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(hook))
    try:
        with _seeded(device, seed):
            output = model(*inputs)
            outputs = _tensors(output)
            result.outputs = [o.detach().clone() for o in outputs]
            if not backward:
                return result
            params = dict(model.named_parameters())
            differentiable = [o for o in outputs if o.requires_grad]
            if not differentiable:
                raise VerifyUsageError("the model's outputs do not require grad: nothing to compare "
                                       "gradients of (pass backward=False)")
            cots = _cotangents(outputs, seed)
            cots = [c for o, c in zip(outputs, cots) if o.requires_grad]
            targets = grad_inputs + list(params.values())
            grads = torch.autograd.grad(differentiable, targets, cots, allow_unused=True, create_graph=double)
            capturing[0] = False
            n = len(grad_inputs)
            result.input_grads = [None if g is None else g.detach().clone() for g in grads[:n]]
            result.param_grads = {name: None if g is None else g.detach().clone()
                                  for name, g in zip(params, grads[n:])}
            if double:
                penalty = sum(g.square().sum() for g in grads[:n] if g is not None and g.requires_grad)
                if not isinstance(penalty, Tensor):
                    raise VerifyUsageError("double_backward needs floating-point inputs whose gradient "
                                           "depends on the parameters")
                grads2 = torch.autograd.grad(penalty, list(params.values()), allow_unused=True)
                result.param_grads2 = {name: None if g is None else g.detach().clone()
                                       for name, g in zip(params, grads2)}
    finally:
        for h in handles:
            h.remove()
    return result


# --- comparing runs ------------------------------------------------------------------------------

def _error(got: list, ref: list, names: list[str]) -> tuple[float, str]:
    """(largest max-abs error over the tensors, the name of the tensor holding it)."""
    worst, where = 0.0, ""
    if len(got) != len(ref):
        return math.inf, f"{len(got)} tensors vs {len(ref)}"
    for name, a, b in zip(names, got, ref):
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            shape = lambda t: "no gradient" if t is None else tuple(t.shape)  # noqa: E731
            return math.inf, f"{name}: {shape(a)} vs {shape(b)}"
        err = max_abs_error(a, b)
        if math.isnan(err) or err > worst:
            worst, where = err, name
            if math.isnan(err):
                break
    return worst, where


def _pick(run: _Run, quantity: str, layer: str | None) -> tuple[list, list[str]]:
    """The tensors of one quantity of a run (whole model: layer None) and their names."""
    if quantity in ("param_grad", "param_grad2"):
        grads = run.param_grads if quantity == "param_grad" else run.param_grads2
        names = [n for n in grads if layer is None or layer == "" or n.startswith(layer + ".")]
        return [grads[n] for n in names], names
    if layer is None:
        values = run.outputs if quantity == "output" else run.input_grads
        what = "output" if quantity == "output" else "input"
        return values, [f"{what} {i}" for i in range(len(values))]
    if quantity == "output":
        values = run.layer_outputs[layer]
        return values, [f"output {i} of call {i}" if len(values) > 1 else "output" for i in range(len(values))]
    calls = run.layer_input_grads[layer]
    return [calls[i] for i in sorted(calls)], [f"x of call {i}" for i in sorted(calls)]


def _check(quantity: str, dtype: str, mode: str, ref: _Run, original: _Run, swapped: _Run,
           layer: str | None) -> Check | None:
    ref_values, names = _pick(ref, quantity, layer)
    if not ref_values:
        return None
    swapped_error, worst = _error(_pick(swapped, quantity, layer)[0], ref_values, names)
    original_error = _error(_pick(original, quantity, layer)[0], ref_values, names)[0]
    ratio = ERROR_RATIO_OUT if quantity == "output" else ERROR_RATIO_GRAD
    # an original that overflows (inf/NaN, the naive path in fp16) bounds nothing: any finite error passes
    original_bounds = math.inf if math.isnan(original_error) else original_error
    # the floor is relative to the reference's magnitude (absolute below 1): a model's outputs and
    # gradients reach 1e3 and more, where an absolute fp64 floor of 1e-12 is below fp64's own rounding
    magnitude = max([1.0] + [float(t.detach().abs().max()) for t in ref_values if t is not None and t.numel()])
    floor = ERROR_FLOOR[DTYPE_NAMES[dtype]]
    bound = error_bound(original_bounds, ratio, DTYPE_NAMES[dtype]) + floor * (magnitude - 1.0)
    ok = swapped_error <= bound
    return Check(quantity, dtype, mode, swapped_error, original_error, bound, ok, worst if not ok or worst else "")


def _quantities(backward: bool, double: bool, layer: bool) -> list[str]:
    names = ["output"]
    if backward:
        names += ["input_grad", "param_grad"] + (["param_grad2"] if double else [])
    return names


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# --- timing --------------------------------------------------------------------------------------

def _timings(original: nn.Module, swapped: nn.Module, args: tuple, dtype_name: str, device: torch.device,
             backward: bool) -> list[TimingRow]:
    """Time and peak memory of both models per direction. The two are timed interleaved (one
    call of each per round, in alternating order: measure.time_interleaved), so that a change in
    the machine's load between them cannot show up as a difference of the models (timed one after
    the other on the shared 2-core dev CPU, the same two models read 1.19x; interleaved, 0.97-1.01x)."""
    from ..bench import measure

    rows = []
    for direction in ("fwd", "fwd+bwd") if backward else ("fwd",):
        calls = {name: (lambda: None, _timed_call(source, args, dtype_name, direction))
                 for name, source in (("original", original), ("swapped", swapped))}
        notes = []
        timed = measure.time_interleaved(calls, device, VERIFY_MIN_TIME_S, VERIFY_MIN_REPEATS, VERIFY_MAX_REPEATS)
        figures = {}
        for name, (_, call) in calls.items():
            outcome = timed[name]
            if isinstance(outcome, BaseException):  # reported, the checks say whether it runs
                figures[name] = None
                notes.append(f"timing failed: {_describe(outcome)}")
            else:
                figures[name] = outcome[0].median_s * 1e3
            try:
                if device.type == "cuda":
                    figures[name + " peak"] = measure.peak_bytes_cuda(lambda: None, call, device)
                else:
                    figures[name + " peak"] = measure.peak_bytes_cpu_in_process(lambda: None, call)
            except Exception as error:  # noqa: BLE001
                figures[name + " peak"] = None
                notes.append(f"peak memory not measured: {_describe(error)}")
        rows.append(TimingRow(dtype_name, direction, figures["original"], figures["swapped"],
                              figures["original peak"], figures["swapped peak"], "; ".join(dict.fromkeys(notes))))
    return rows


def _timed_call(source: nn.Module, args: tuple, dtype_name: str, direction: str):
    """One timed call of a copy of `source` in `dtype_name`: eval mode without grad (fwd), or
    training mode with the gradients of the floating inputs and the parameters (fwd+bwd)."""
    dtype = DTYPE_NAMES[dtype_name]
    model = deepcopy_detached(source).to(dtype).train(direction != "fwd")
    inputs, leaves = _floating_inputs(args, dtype, direction != "fwd")
    targets = leaves + [p for p in model.parameters() if p.requires_grad]

    def call(_):
        if direction == "fwd":
            with torch.no_grad():
                return model(*inputs)
        outs = [o for o in _tensors(model(*inputs)) if o.requires_grad]
        return torch.autograd.grad([o.sum() for o in outs], targets, allow_unused=True)
    return call


def _timing_method(device: torch.device) -> str:
    memory = ("torch.cuda.max_memory_allocated() growth" if device.type == "cuda" else
              "growth of this process's resident peak (VmHWM) over one call, in process")
    return (f"median of >= {VERIFY_MIN_REPEATS} calls and >= {VERIFY_MIN_TIME_S:g} s after a warm-up, the "
            f"original and the swapped model interleaved (one call of each per round), as `fastattn bench` "
            f"times; fwd: eval mode, no grad; fwd+bwd: training mode, gradients of the inputs and parameters; "
            f"peak memory: {memory}")


# --- the entry point -----------------------------------------------------------------------------

def _dtype_skip(dtype_name: str, device: torch.device) -> str | None:
    if device.type == "cuda" and dtype_name == "bfloat16" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} does not support bfloat16"
    return None


def verify(model: nn.Module, example_inputs, *, dtypes=("float64", "float32", "bfloat16"),
           backward: bool = True, double_backward: bool = False, backend: str | None = None,
           probe: bool = True, timing: bool = True, seed: int = VERIFY_SEED) -> VerifyReport:
    """Swap a deep copy of `model` and check it against the original, layer by layer.

    example_inputs: a tensor, a tuple of positional arguments, or a callable returning either
        (called once, from RNG seed `seed`). Floating-point tensors are cast to each dtype.
    dtypes: the dtypes to check in (names or torch dtypes); one the model or device cannot run
        is skipped, with the reason in `report.skipped_dtypes`.
    backward: compare input and parameter gradients (of a fixed random projection of the outputs).
    double_backward: also compare second-order parameter gradients (an R1 penalty on the inputs).
    backend: the fastattn backend for the swapped layers (None: automatic, or each native
        layer's own).
    probe: let swap_attention probe each layer before swapping it (its verify=); False swaps every
        structural match unchecked, so this report is the only check.
    timing: measure time and peak memory of both models (fwd and fwd+bwd) per dtype.
    `model` itself is not changed. Returns a VerifyReport; `report.ok` holds when every check
    holds (and fails when no attention layer was swapped or one was left unswapped).
    """
    if not isinstance(model, nn.Module):
        raise VerifyUsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(dtypes, (str, torch.dtype)):
        dtypes = (dtypes,)
    names = list(dict.fromkeys(_dtype_name(d) for d in dtypes))
    if not names:
        raise VerifyUsageError("dtypes must name at least one dtype")
    try:
        check_backend_name(backend)
    except Exception as error:
        raise VerifyUsageError(str(error)) from error
    device = _model_device(model)
    args = _example_args(example_inputs, device, seed)
    original, swapped, layers, unswapped = _prepare(model, backend, probe)
    layer_names = [layer.name for layer in layers]
    model_checks: list[Check] = []
    if not layers and not unswapped:
        model_checks.append(Check("swapped", ok=False, message="swap_attention swapped no attention layer"))
    model_checks += [Check("swapped", ok=False, message=line) for line in unswapped]
    run_dtypes, skipped, timings = [], {}, []
    references = {}
    for mode in ("eval", "train"):
        try:
            references[mode] = _run(original, args, torch.float64, mode == "train", layer_names, backward,
                                    double_backward, seed, device)
        except VerifyUsageError:
            raise
        except Exception as error:
            raise VerifyUsageError(f"the original model raised on the example inputs in float64, {mode} "
                                   f"mode ({_describe(error)}): check the inputs' shapes and types") from error
    for dtype_name in names:
        why = _dtype_skip(dtype_name, device)
        runs = {}
        for mode in ("eval", "train") if why is None else ():
            ref = references[mode]
            try:
                orig = ref if dtype_name == "float64" else _run(
                    original, args, DTYPE_NAMES[dtype_name], mode == "train", layer_names, backward,
                    double_backward, seed, device)
            except Exception as error:  # noqa: BLE001 - the device or the model lacks this dtype
                why = f"the original model does not run in {dtype_name} on {device.type}: {_describe(error)}"
                break
            try:
                with always_capture():  # fastattn's core at every size, even a small example input's
                    swap = _run(swapped, args, DTYPE_NAMES[dtype_name], mode == "train", layer_names,
                                backward, double_backward, seed, device)
                runs[mode] = (ref, orig, swap)
            except Exception as error:  # noqa: BLE001 - a failed check, reported
                model_checks.append(Check("runs", dtype_name, mode, ok=False,
                                          message=f"the swapped model raised {_describe(error)}"))
        if why is not None:
            skipped[dtype_name] = why
            continue
        run_dtypes.append(dtype_name)
        for mode, (ref, orig, swap) in runs.items():
            for quantity in _quantities(backward, double_backward, layer=False):
                check = _check(quantity, dtype_name, mode, ref, orig, swap, None)
                if check is not None:
                    model_checks.append(check)
            for layer in layers:
                for quantity in _quantities(backward, double_backward, layer=True):
                    check = _check(quantity, dtype_name, mode, ref, orig, swap, layer.name)
                    if check is not None:
                        layer.checks.append(check)
        if timing:
            timings += _timings(original, swapped, args, dtype_name, device, backward)
    from ..version import __version__

    environment = {"torch": torch.__version__, "fastattn": __version__, "python": platform.python_version(),
                   "backend": backend, "probe": probe, "backward": backward, "double_backward": double_backward,
                   "seed": seed, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        environment["gpu"] = torch.cuda.get_device_name(device)
    return VerifyReport(type(model).__name__, str(device), environment, run_dtypes, skipped, layers,
                        model_checks, unswapped, timings, _timing_method(device) if timing else "")
