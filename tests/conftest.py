"""Shared test configuration.

TRITON_INTERPRET=1 must be set before triton is first imported for the Triton kernels to run on
CPU tensors; setting it here (the first code pytest runs) makes the interpreter tests work in a
plain `pytest` run. It has no effect on CUDA runs of the GPU tests, which check for a device.
"""
import os

if not os.environ.get("FASTATTN_GPU_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

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
