"""Triton kernels and their launchers (installed as `fastattn.kernels`). No autograd, no nn."""
