"""The Triton kernels as torch.library operators, with fake implementations and autograd.

    torch.ops.fastattn.attention_forward(q, k, v, scale, precision) -> (out, lse, stats)
    torch.ops.fastattn.attention_backward(grad_out, grad_lse, q, k, v, out, stats, scale, precision)
        -> (dq, dk, dv)

`stats` (B, 2, N) fp32 holds each query's row max and row sum of the base-2 logits, which the
backward recomputes probabilities from (kernels/forward.py says why not from the lse); it is
not differentiable and `attention` does not return it.

Registered with torch.library.triton_op where the installed torch has it (torch.compile then
sees the Triton kernels themselves, and fullgraph compiles have no graph break), otherwise with
torch.library.custom_op and an explicit fake implementation. Under Triton's interpreter
(TRITON_INTERPRET=1, CPU tensors) custom_op is used as well: triton_op traces its body with
wrap_triton, which accepts compiled kernels only.

`precision` is tl.dot's input_precision for fp32 inputs ("ieee", "tf32" or "tf32x3"; ignored for
fp16/bf16); `fp32_dot_precision()` derives it from PyTorch's matmul precision setting.
This module imports triton and is the only one that imports the kernels; the backend loads it on
first use (backend.load_ops).
"""
import contextlib

import torch
from torch import Tensor
from typing import Optional

from ...kernels.autotune import backward_config, forward_config, interpreting
from ...kernels.backward import launch_backward
from ...kernels.configs import pad_width
from ...kernels.forward import launch_forward
from ..torch_chunked import differentiable_grads

__all__ = ["attention", "interpreting", "fp32_dot_precision", "attention_forward_op", "attention_backward_op", "USES_TRITON_OP"]

_PRECISIONS = ("ieee", "tf32", "tf32x3")
USES_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not interpreting()


def _constant_under_compile(fn):
    """torch.compile reads the setting once, when it traces (the settings' getters are C
    functions dynamo cannot trace); eager calls read it every time."""
    mark = getattr(torch.compiler, "assume_constant_result", None)
    return mark(fn) if mark is not None else fn


@_constant_under_compile
def fp32_dot_precision() -> str:
    """tl.dot precision for fp32 inputs that matches what PyTorch allows for fp32 matmuls:
    TF32 only when PyTorch allows it (torch.backends.cuda.matmul.fp32_precision == "tf32", or,
    where that is unset or absent, torch.get_float32_matmul_precision() != "highest",
    which is what torch.backends.cuda.matmul.allow_tf32 = True sets); else full fp32."""
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if setting in ("ieee", "tf32"):
        return setting
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _plain(kernel):
    return kernel


def _kernel_call():
    return torch.library.wrap_triton if USES_TRITON_OP else _plain


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    batch, d_qk, n_queries = q.shape
    d_v = v.shape[1]
    out = q.new_empty((batch, d_v, n_queries))
    lse = q.new_empty((batch, n_queries), dtype=torch.float32)
    stats = q.new_empty((batch, 2, n_queries), dtype=torch.float32)
    if n_queries == 0:
        return out, lse, stats
    d_pad = pad_width(d_qk)

    def run(config):
        launch_forward(_plain, q, k, v, out, lse, stats, scale, precision, config, d_pad)

    config = forward_config(q, k, v, precision, run)
    launch_forward(_kernel_call(), q, k, v, out, lse, stats, scale, precision, config, d_pad)
    return out, lse, stats


def _backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
              stats: Tensor, scale: float, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    d_pad, dv_pad = pad_width(q.shape[1]), pad_width(v.shape[1])
    args = (grad_out, grad_lse, q, k, v, out, stats, scale, precision)

    def run(config):
        launch_backward(_plain, *args, config, d_pad, dv_pad)

    config = backward_config(q, k, v, precision, run)
    return launch_backward(_kernel_call(), *args, config, d_pad, dv_pad)


if USES_TRITON_OP:
    attention_forward_op = torch.library.triton_op("fastattn::attention_forward", mutates_args=())(_forward)
    attention_backward_op = torch.library.triton_op("fastattn::attention_backward", mutates_args=())(_backward)
else:
    attention_forward_op = torch.library.custom_op("fastattn::attention_forward", mutates_args=())(_forward)
    attention_backward_op = torch.library.custom_op("fastattn::attention_backward", mutates_args=())(_backward)

    @attention_forward_op.register_fake
    def _forward_fake(q, k, v, scale, precision):
        batch, _, n_queries = q.shape
        return (q.new_empty((batch, v.shape[1], n_queries)), q.new_empty((batch, n_queries), dtype=torch.float32),
                q.new_empty((batch, 2, n_queries), dtype=torch.float32))

    @attention_backward_op.register_fake
    def _backward_fake(grad_out, grad_lse, q, k, v, out, stats, scale, precision):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, precision = inputs
    out, _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, out, stats)
    ctx.scale, ctx.precision = scale, precision


def _attention_grad(ctx, grad_out, grad_lse, _grad_stats):
    q, k, v, out, stats = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # create_graph=True (R1 / WGAN-GP penalties through attention): the kernels have no
        # second derivative, so the gradients are recomputed with the torch backend's
        # differentiable chunked ops, which do; first-order backward stays on the kernels.
        needs = tuple(t.requires_grad for t in (q, k, v))
        return differentiable_grads(q, k, v, grad_out, grad_lse, ctx.scale, needs) + (None, None)
    dq, dk, dv = attention_backward_op(grad_out, grad_lse, q, k, v, out, stats, ctx.scale, ctx.precision)
    return dq, dk, dv, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastattn::attention_backward has no derivative; double backward through the triton "
        "backend is computed by recomputation when create_graph=True is set on the first backward"
    )


def _no_double_backward_setup(ctx, inputs, output):
    pass


attention_forward_op.register_autograd(_attention_grad, setup_context=_setup_context)
attention_backward_op.register_autograd(_no_double_backward, setup_context=_no_double_backward_setup)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, precision: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Differentiable (out, lse) by the Triton kernels. Inputs are validated by the caller
    (fastattn.functional); `precision` defaults to fp32_dot_precision() for fp32 inputs."""
    if precision is None:
        precision = fp32_dot_precision() if q.dtype == torch.float32 else "ieee"
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {list(_PRECISIONS)} or None, got {precision!r}")
    with _on_device_of(q):
        out, lse, _ = attention_forward_op(q, k, v, float(scale), precision)
    return out, lse


def _on_device_of(t: Tensor):
    """Triton launches on the *current* CUDA device: make it the inputs' device (a model on
    cuda:1 without torch.cuda.set_device(1) would otherwise launch on cuda:0 with cuda:1
    pointers). Compiled graphs get Inductor's own device guards; the autograd engine runs each
    device's backward with that device current."""
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)
