"""Shared test configuration.

TRITON_INTERPRET=1 must be set before triton is first imported for the Triton kernels to run on
CPU tensors. On a machine without CUDA (CI) it is set here, the first code pytest runs, so a plain
`pytest` runs the real kernel code in the interpreter. With a CUDA device (or FASTATTN_GPU_TESTS=1)
it is left unset: the same `pytest` then runs the GPU tests on compiled kernels, and the
interpreter tests skip. (`import torch` does not import triton, so asking torch first is safe.)
"""
import os

import torch

if not os.environ.get("FASTATTN_GPU_TESTS") and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastattn.testing import assert_close  # noqa: F401  (re-exported for tests)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a developer's FASTATTN_BACKEND must not leak in."""
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _fresh_dispatch_choices():
    """spatial_attention remembers its choice and strategy per input signature, decided with the
    fastattn.constants of the moment; tests change those constants (monkeypatch), so each test
    starts and ends with nothing remembered, as a user who changes them calls clear_dispatch_cache()."""
    from fastattn.functional import clear_dispatch_cache

    clear_dispatch_cache()
    yield
    clear_dispatch_cache()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread is as fast as two on an idle machine and keeps the
    tests from slowing down tenfold (OpenMP oversubscription) on a busy one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
