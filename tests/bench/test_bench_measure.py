"""The measurements behind `fastattn bench`: presets, FLOP counts, peak memory, accuracy."""
import pytest
import torch

from fastattn import reference_attention
from fastattn.bench import measure
from fastattn.bench.presets import Site, attention_flops, build_cases, over_cpu_work_cap
from fastattn.shapes import gan_shapes


def test_flop_counts_are_2BNM_times_the_matmul_widths():
    site = Site.custom("s", 2, 64, 16, 8, 32)
    assert attention_flops(site, "fwd") == 2 * 2 * 64 * 16 * (8 + 32)
    assert attention_flops(site, "bwd") == 2 * 2 * 64 * 16 * (3 * 8 + 2 * 32)
    assert attention_flops(site, "fwd+bwd") == 2 * 2 * 64 * 16 * (4 * 8 + 3 * 32)


def test_default_preset_on_cpu_is_quick_and_gan_preset_states_every_scaled_batch():
    cpu = torch.device("cpu")
    cases, preset = build_cases("default", cpu, free_bytes=16 * 2**30)
    assert preset == "quick" and {c.site.B for c in cases} == {1} and {c.dtype for c in cases} == {"float32"}
    cases, preset = build_cases("gan", cpu, free_bytes=16 * 2**30, directions=["fwd"])
    # the high-resolution sites (and the 512-wide autoencoder site) are over the CPU work cap even
    # at B=1: they are left to the stress preset or an explicit --shape
    assert {s.id for s in gan_shapes() if s.N >= 16384} <= set(over_cpu_work_cap())
    assert [c.site.id for c in cases] == [s.id for s in gan_shapes() if s.id not in over_cpu_work_cap()]
    for case in cases:
        config = next(s for s in gan_shapes() if s.id == case.site.id)
        assert 1 <= case.site.B <= config.B
        assert (case.site.batch_note != "") == (case.site.B != config.B), case.site


def test_gan_preset_batch_shrinks_with_the_memory_budget():
    # biggan128_G: the naive fwd+bwd holds four (4096, 1024) fp32 matrices, 64 MiB per sample.
    gpu = torch.device("cuda")  # only the device type matters here (no CPU work cap)
    small, _ = build_cases("gan", gpu, 2**30, shape_ids=["biggan128_G"], dtypes=["float32"], directions=["fwd"])
    large, _ = build_cases("gan", gpu, 64 * 2**30, shape_ids=["biggan128_G"], dtypes=["float32"], directions=["fwd"])
    assert small[0].site.B == 8  # half of 1 GiB / 64 MiB
    assert large[0].site.B == 256 and large[0].site.batch_note == ""
    assert "memory" in small[0].site.batch_note


def test_cpu_peak_memory_of_naive_forward_is_its_two_n_by_m_matrices():
    # logits and softmax, (1, 1024, 1024) fp32 each: 8 MiB, plus a 64 KiB output.
    site = Site.custom("m", 1, 1024, 1024, 8, 16)
    peak = measure.peak_bytes_cpu(site, "float32", "fwd", "naive", seed=0, scale=1.0, threads=1)
    # Quiet machine: within ~100 KiB. Under load it read up to ~300 KiB low (freed pages already
    # resident before the high-water reset are reused uncounted; RSS counters are batched), so
    # the band is -1 MiB/+512 KiB: still far from one matrix (4 MiB) or three (12 MiB).
    assert 7 * 2**20 <= peak <= 8 * 2**20 + 2**19, peak
    # fastattn keeps this 4 MiB problem's probabilities (under TORCH_KEEP_PROBS_BYTES): at most
    # naive's two matrices; the chunked path's bound is tested in tests/test_torch_backend.py
    ours = measure.peak_bytes_cpu(site, "float32", "fwd", "fastattn-torch", seed=0, scale=1.0, threads=1)
    assert ours <= peak + 2**19


def test_accuracy_check_flags_a_wrong_output_and_passes_the_reference_itself():
    site = Site.custom("a", 1, 40, 12, 4, 6)
    x = measure.make_inputs(site, "float32", torch.device("cpu"), seed=1)
    reference = measure.reference_results(x, 1.0, need_grads=True)
    setup, call = measure.make_call(reference_attention, "fwd+bwd", x, 1.0)
    good = measure.accuracy(call(setup()), reference, "fwd+bwd", "float32")
    assert good["out_within_tol"] and good["grad_within_tol"] and good["max_err"] < 1e-5
    out, grads = call(setup())
    bad = measure.accuracy((out * 1.01, grads), reference, "fwd+bwd", "float32")
    assert not bad["out_within_tol"] and bad["out_err"] > 1e-4


def test_tflops_and_percent_of_bound_follow_the_hopper_clock_model():
    from fastattn.bench.report import add_derived

    # d_qk = d_v = 64: forward 2*128/4096 + 1/16 = 0.125 clocks per SM per (query, key) pair.
    env = {"device_type": "cuda", "compute_capability": "9.0", "sm_count": 132, "sm_clock_hz": 1.98e9}
    pairs = 2 * 4096 * 1024
    bound_s = pairs * 0.125 / (132 * 1.98e9)
    site = Site.custom("h", 2, 4096, 1024, 64, 64)
    record = {"shape": "h", "B": 2, "N": 4096, "M": 1024, "d_qk": 64, "d_v": 64, "dtype": "bfloat16",
              "direction": "fwd", "provider": "fastattn-triton", "status": "ok", "median_s": 2 * bound_s,
              "flops": attention_flops(site, "fwd")}
    fp32 = {**record, "dtype": "float32"}
    add_derived([record, fp32], env)
    assert abs(record["pct_of_bound"] - 50.0) < 1e-9
    assert abs(record["tflops"] - 2 * pairs * 128 / (2 * bound_s) / 1e12) < 1e-9
    assert fp32["pct_of_bound"] is None  # the bound is for fp16/bf16 tensor cores only


def test_penalty_direction_counts_the_second_backward_and_checks_second_order_grads():
    from fastattn import spatial_attention
    from fastattn.bench.presets import PENALTY_DIRECTION

    site = Site.custom("p", 2, 30, 11, 4, 6)
    assert attention_flops(site, PENALTY_DIRECTION) == 2 * 2 * 30 * 11 * (11 * 4 + 8 * 6)
    x = measure.make_inputs(site, "float32", torch.device("cpu"), seed=2)
    reference = measure.reference_results(x, 1.0, need_grads=True) + (measure.reference_penalty_grads(x, 1.0),)
    for fn in (reference_attention, lambda q, k, v, s: spatial_attention(q, k, v, scale=s, backend="torch")):
        setup, call = measure.make_call(fn, PENALTY_DIRECTION, x, 1.0)
        result = measure.accuracy(call(setup()), reference, PENALTY_DIRECTION, "float32")
        assert result["out_within_tol"] and result["grad_err"] < 1e-3, result
    first_order_only = measure.make_call(reference_attention, "fwd+bwd", x, 1.0)
    out, grads = first_order_only[1](None)
    wrong = measure.accuracy((out, grads), reference, PENALTY_DIRECTION, "float32")
    assert not wrong["grad_within_tol"]  # first-order grads are not the penalty's


class _FakeProviders:
    """Providers that log their calls and advance a fake clock by a set duration per call."""

    def __init__(self, durations: dict, fail_on_call: dict | None = None):
        self.now, self.log, self.durations = 0.0, [], durations
        self.fail_on_call, self.count = fail_on_call or {}, dict.fromkeys(durations, 0)

    def clock(self) -> float:
        return self.now

    def pair(self, name: str):
        def call(_):
            self.count[name] += 1
            if self.count[name] == self.fail_on_call.get(name):
                raise RuntimeError(f"{name} failed")
            self.log.append(name)
            self.now += self.durations[name]
            return name
        return (lambda: None), call

    def calls(self) -> dict:
        return {name: self.pair(name) for name in self.durations}


def test_interleaved_timing_runs_providers_round_robin_and_gives_each_the_same_rounds():
    fake = _FakeProviders({"naive": 2**-4, "sdpa": 2**-6, "fastattn": 2**-7})
    out = measure.time_interleaved(fake.calls(), torch.device("cpu"), min_time_s=2**-3, min_repeats=3,
                                   max_repeats=20, clock=fake.clock)
    # one warm-up round in the order given, then timed rounds, each starting one provider later,
    # until every provider has min_repeats and min_time_s of its own time: fastattn needs 16 rounds
    # of 1/128 s, and so all run 16
    orders = [["naive", "sdpa", "fastattn"], ["fastattn", "sdpa", "naive"], ["sdpa", "fastattn", "naive"],
              ["sdpa", "naive", "fastattn"], ["fastattn", "naive", "sdpa"], ["naive", "fastattn", "sdpa"]]
    assert fake.log == ["naive", "sdpa", "fastattn"] + [p for r in range(16) for p in orders[r % 6]]
    # inside the rounds, each provider runs right after each other one equally often
    after = {}
    for order in orders:
        for before, name in zip(order, order[1:]):
            after[(before, name)] = after.get((before, name), 0) + 1
    assert sorted(after.values()) == [2] * 6
    assert [out[n][0].n_repeats for n in ("naive", "sdpa", "fastattn")] == [16, 16, 16]
    assert out["naive"][0].median_s == 2**-4 and out["fastattn"][0].median_s == 2**-7
    assert out["sdpa"][1] == "sdpa"  # the first warm-up call's result, for the accuracy check


def test_interleaved_timing_drops_a_failing_provider_and_keeps_timing_the_others():
    fake = _FakeProviders({"naive": 0.01, "sdpa": 0.01, "fastattn": 0.01}, fail_on_call={"sdpa": 3})
    out = measure.time_interleaved(fake.calls(), torch.device("cpu"), min_time_s=0.0, min_repeats=4,
                                   max_repeats=4, clock=fake.clock)
    # warm-up, round 0, then sdpa fails on its third call (round 1, reversed order) and leaves
    assert fake.log == ["naive", "sdpa", "fastattn", "naive", "sdpa", "fastattn", "fastattn", "naive",
                        "fastattn", "naive", "naive", "fastattn"]
    assert isinstance(out["sdpa"], RuntimeError) and list(out) == ["naive", "sdpa", "fastattn"]
    assert out["naive"][0].n_repeats == out["fastattn"][0].n_repeats == 4


def test_load_that_changes_during_a_run_hits_interleaved_providers_alike():
    # the machine slows 3x halfway through: timed one after another, naive would see only the
    # fast half and fastattn only the slow half; interleaved, the ratio of medians stays 0.5
    fake = _FakeProviders({"naive": 0.02, "fastattn": 0.01})
    base = dict(fake.durations)
    pairs = fake.calls()

    def slowing(name):
        setup, call = pairs[name]

        def slowed(arg):
            fake.durations[name] = base[name] * (3 if len(fake.log) >= 10 else 1)
            return call(arg)
        return setup, slowed
    out = measure.time_interleaved({n: slowing(n) for n in pairs}, torch.device("cpu"), min_time_s=0.0,
                                   min_repeats=9, max_repeats=9, clock=fake.clock)
    assert out["fastattn"][0].median_s / out["naive"][0].median_s == pytest.approx(0.5)
