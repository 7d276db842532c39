"""Gradient penalties for the discriminator: each is a double backward through D, attention
layers included (fastattn's backends compute it without holding the N x M attention matrix)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["r1_penalty"]


def r1_penalty(d_out: Tensor, inputs: Tensor) -> Tensor:
    """E_x |grad_x sum D(x)|^2 over the batch (Mescheder et al. 2018, "Which training methods for
    GANs actually converge?"); `inputs` must require grad and `d_out` be D(inputs). The graph is
    kept (create_graph) so the penalty's own backward reaches D's weights."""
    (grad,) = torch.autograd.grad(d_out.sum(), inputs, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
