"""pytest-benchmark suite over the same cases and providers as `fastattn bench`.

    pytest benchmarks/ --benchmark-only                              # quick preset, this device
    pytest benchmarks/ --benchmark-only --fastattn-preset stress --fastattn-memory

Not part of the normal test suite: `pytest` with no arguments collects only tests/
(testpaths in pyproject.toml). The JSON report goes to --benchmark-json, by default
benchmarks/results/pytest-benchmark-<device>-<preset>.json.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fastattn.bench.presets import PRESETS, build_cases
from fastattn.bench.providers import ALL_PROVIDERS, default_providers

RESULTS = Path(__file__).resolve().parent / "results"


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def pytest_addoption(parser):
    group = parser.getgroup("fastattn")
    group.addoption("--fastattn-preset", default="quick", choices=PRESETS, help="which `fastattn bench` preset")
    group.addoption("--fastattn-provider", action="append", default=None, choices=ALL_PROVIDERS,
                    help="providers (repeatable; default: those `fastattn bench` runs on this device)")
    group.addoption("--fastattn-direction", action="append", default=None, choices=("fwd", "bwd", "fwd+bwd"))
    group.addoption("--fastattn-memory", action="store_true",
                    help="also record peak memory (CPU: one forked process per case) in extra_info")
    group.addoption("--fastattn-threads", type=int, default=None, help="torch CPU threads")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Save the JSON report unless the user chose a path (runs before pytest-benchmark reads it).
    if hasattr(config.option, "benchmark_json") and config.option.benchmark_json is None \
            and not getattr(config.option, "collectonly", False):
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"pytest-benchmark-{_device().type}-{config.getoption('--fastattn-preset')}.json"
        config.option.benchmark_json = open(RESULTS / name, "wb")  # noqa: SIM115 - the plugin closes it
    if config.getoption("--fastattn-threads"):
        torch.set_num_threads(config.getoption("--fastattn-threads"))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = _device()
    cases, _ = build_cases(config.getoption("--fastattn-preset"), device, _free_bytes(device),
                           directions=config.getoption("--fastattn-direction"))
    providers = config.getoption("--fastattn-provider") or default_providers(device)
    metafunc.parametrize("provider", providers)
    metafunc.parametrize("bench_case", cases,
                         ids=[f"{c.site.id}-B{c.site.B}-{c.dtype}-{c.direction}" for c in cases])
