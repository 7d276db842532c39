"""Time every provider on every case of a `fastattn bench` preset with pytest-benchmark."""
from __future__ import annotations

import pytest
import torch

from fastattn.bench import measure
from fastattn.bench.providers import NotSupported, make_provider, skip_reason



def test_attention(benchmark, bench_case, provider, request):
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 62
    why = skip_reason(provider, bench_case, device, free)
    if why:
        pytest.skip(f"not supported: {why}")
    try:
        fn = make_provider(provider)
        inputs = measure.make_inputs(bench_case.site, bench_case.dtype, device, seed=0)
        setup, call = measure.make_call(fn, bench_case.direction, inputs, bench_case.site.scale)
        call(setup())  # warm-up; also where an unsupported provider says so
    except NotSupported as error:
        pytest.skip(f"not supported: {error}")

    def timed(arg):
        result = call(arg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    site = bench_case.site
    benchmark.group = f"{site.id} B={site.B} {bench_case.dtype} {bench_case.direction}"
    benchmark.extra_info.update(shape=site.id, B=site.B, N=site.N, M=site.M, d_qk=site.d_qk, d_v=site.d_v,
                                dtype=bench_case.dtype, direction=bench_case.direction, provider=provider,
                                flops=bench_case.flops())
    benchmark.pedantic(timed, setup=lambda: ((setup(),), {}), rounds=5 if device.type == "cpu" else 50,
                       iterations=1, warmup_rounds=1)
    if request.config.getoption("--fastattn-memory"):
        if device.type == "cuda":
            peak = measure.peak_bytes_cuda(setup, call, device)
        else:
            peak = measure.peak_bytes_cpu(site, bench_case.dtype, bench_case.direction, provider, 0, site.scale)
        benchmark.extra_info["peak_bytes"] = peak
