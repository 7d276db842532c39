"""fastattn.verify: the reference GAN and corpus layers pass with every report field filled in; a
wrong adapter, a layer tampered with after the swap and a dtype the model cannot run are reported."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastattn
from fastattn import register_adapter, swap_attention, unregister_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "swap"))
from swap_corpus import CORPUS  # noqa: E402
from verify_models import (CORRECT_ADAPTER, WRONG_ADAPTER, discriminator, generator,  # noqa: E402
                           scaled_model, tamper)

pytestmark = pytest.mark.usefixtures("one_thread")

CHECK_FIELDS = {"quantity", "dtype", "mode", "swapped_error", "original_error", "bound", "ok", "worst", "message"}


@pytest.fixture
def adapter():
    registered = []

    def register(family):
        registered.append(register_adapter(family, replace=True).name)

    yield register
    for name in registered:
        unregister_adapter(name, missing_ok=True)


def test_reference_generator_passes_every_check_in_every_dtype_and_leaves_the_model_unchanged():
    G = generator()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    report = fastattn.verify(G, torch.randn(2, 16), timing=False)
    assert report.ok, str(report)
    assert report.dtypes == ["float64", "float32", "bfloat16"] and report.skipped_dtypes == {}
    [layer] = report.layers
    assert (layer.name, layer.match, layer.family) == ("attn", "native", "fastattn")
    quantities = {(c.quantity, c.dtype, c.mode) for c in layer.checks}
    assert len(quantities) == 3 * 3 * 2  # output, input grad, param grad x dtypes x modes
    assert G.attn.attention == "naive"  # verify swapped a copy
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())


def test_reference_discriminator_report_has_every_json_field_with_second_order_and_timings():
    report = fastattn.verify(discriminator(), torch.randn(2, 3, 16, 16), dtypes=("float32",),
                             double_backward=True)
    assert report.ok, str(report)
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["failures"] == []
    assert {"model", "device", "environment", "dtypes", "skipped_dtypes", "layers", "model_checks",
            "unswapped", "timings", "timing_method", "rule", "quantities"} <= set(data)
    assert {"torch", "fastattn", "backend", "seed"} <= set(data["environment"])
    [layer] = data["layers"]
    assert {"name", "module_type", "match", "family", "pattern", "probe_error", "notes", "checks"} <= set(layer)
    assert {c["quantity"] for c in layer["checks"]} == {"output", "input_grad", "param_grad", "param_grad2"}
    assert {c["quantity"] for c in data["model_checks"]} == {"output", "input_grad", "param_grad", "param_grad2"}
    for check in layer["checks"] + data["model_checks"]:
        assert set(check) == CHECK_FIELDS and check["ok"] and check["swapped_error"] <= check["bound"]
    assert [(t["dtype"], t["direction"]) for t in data["timings"]] == [("float32", "fwd"), ("float32", "fwd+bwd")]
    for row in data["timings"]:
        assert row["original_ms"] > 0 and row["swapped_ms"] > 0
        assert row["original_peak_bytes"] is not None and row["swapped_peak_bytes"] is not None
    markdown, text = report.to_markdown(), str(report)
    assert "| attn | float32 | train |" in markdown and "PASS" in text and "2nd-order grad" in text


@pytest.mark.parametrize("name", ["wrapped_conv_sqrt", "groupnorm_attnblock", "sdpa_heads", "returns_map_at",
                                  "rosinality_custom_sn", "biggan_y_ignored_scaled"])
def test_corpus_layer_passes_every_check(name):
    build, shape, _ = CORPUS[name]
    layer = build(0)
    with torch.no_grad():
        for param in layer.parameters(recurse=False):
            if param.numel() == 1:
                param.fill_(0.6)
    x = torch.randn(2, *shape)
    inputs = (x, torch.randn(2, shape[0])) if name.startswith("biggan_y") else x
    report = fastattn.verify(layer, inputs, timing=False)
    assert report.ok, str(report)
    [record] = report.layers
    assert record.name == "" and record.match == ("family" if name == "rosinality_custom_sn" else "traced")
    assert not record.notes


def test_correct_adapter_passes(adapter):
    adapter(CORRECT_ADAPTER)
    report = fastattn.verify(scaled_model(), torch.randn(2, 3, 4, 5), dtypes=("float32",), timing=False)
    assert report.ok, str(report)
    assert [(layer.name, layer.match, layer.family) for layer in report.layers] == [("1", "family", "scaled_qkv_gain")]


def test_wrong_adapter_fails_naming_the_layer_whether_the_probe_refuses_it_or_not(adapter):
    adapter(WRONG_ADAPTER)
    x = torch.randn(2, 3, 4, 5)
    refused = fastattn.verify(scaled_model(), x, dtypes=("float32",), timing=False)
    assert not refused.ok and refused.layers == []
    assert any(line.startswith("FAIL model swapped: 1 (ScaledAttention) not swapped: as scaled_qkv_gain_no_scale")
               for line in refused.failures), refused.failures
    unchecked = fastattn.verify(scaled_model(), x, dtypes=("float32",), probe=False, timing=False)
    assert not unchecked.ok
    assert any(line.startswith("FAIL 1 float32 eval output: swapped error") for line in unchecked.failures), \
        unchecked.failures


def test_layer_tampered_with_after_the_swap_fails_naming_the_layer_and_check(adapter):
    adapter(CORRECT_ADAPTER)
    model = scaled_model()
    assert [s.name for s in swap_attention(model).swapped] == ["1"]
    tamper(model, "1")
    report = fastattn.verify(model, torch.randn(2, 3, 4, 5), dtypes=("float32",), timing=False)
    assert not report.ok
    [layer] = report.layers
    assert layer.name == "1" and not layer.ok
    failing = {(c.quantity, c.mode) for c in layer.checks if not c.ok}
    assert ("output", "eval") in failing and ("param_grad", "train") in failing
    assert "FAIL 1 float32 eval output: swapped error" in str(report)


class _NoHalf(nn.Module):
    """Stands in for a model or device without float16 support."""

    def __init__(self):
        super().__init__()
        self.body = generator()

    def forward(self, z):
        if z.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return self.body(z)


def test_dtype_the_model_cannot_run_is_skipped_with_the_reason_in_the_report():
    report = fastattn.verify(_NoHalf(), torch.randn(2, 16), dtypes=("float32", "float16"), timing=False)
    assert report.ok and report.dtypes == ["float32"]
    assert "not implemented for 'Half'" in report.skipped_dtypes["float16"]
    assert "float16 skipped: the original model does not run in float16 on cpu" in str(report)
    assert json.loads(report.to_json())["skipped_dtypes"]["float16"].startswith("the original model")


def test_model_without_attention_fails_and_zero_scalar_gets_a_note():
    report = fastattn.verify(nn.Sequential(nn.Conv2d(3, 3, 1)), torch.randn(1, 3, 4, 4), dtypes=("float32",),
                             timing=False)
    assert not report.ok and report.failures == ["FAIL model swapped: swap_attention swapped no attention layer"]
    G = generator()
    with torch.no_grad():
        G.attn.gamma.zero_()
    report = fastattn.verify(G, torch.randn(2, 16), dtypes=("float32",), backward=False, timing=False)
    assert report.ok and "residual scalar 'gamma' is 0" in report.layers[0].notes[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"dtypes": ("int8",)}, "dtypes must name floating-point dtypes"),
    ({"backend": "nope"}, "nope"),
])
def test_bad_arguments_raise_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastattn.verify(generator(), torch.randn(2, 16), timing=False, **kwargs)


def test_model_that_rejects_the_inputs_raises_a_usage_error():
    with pytest.raises(ValueError, match="raised on the example inputs in float64"):
        fastattn.verify(generator(), torch.randn(2, 17), timing=False)


_CALLS: list[str] = []


class _Tagged(nn.Module):
    """Records its tag on every forward (copies keep the tag), so a test can see call order."""

    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        _CALLS.append(self.tag)
        return self.lin(x)


def _longest_run(seq: list[str]) -> int:
    best = run = 0
    for i, item in enumerate(seq):
        run = run + 1 if i and seq[i - 1] == item else 1
        best = max(best, run)
    return best


def test_verify_times_the_original_and_the_swapped_model_interleaved(monkeypatch):
    # timed one after the other, a change in the machine's load between the two showed up as a
    # 1.19x "slowdown" of the swapped model; each round must run one call of each
    from fastattn.bench import measure
    from fastattn.constants import VERIFY_MIN_REPEATS
    from fastattn.verification.run import _timings

    monkeypatch.setattr(measure, "peak_bytes_cpu_in_process", lambda setup, call: 0)  # timing calls only
    _CALLS.clear()
    rows = _timings(_Tagged("original"), _Tagged("swapped"), (torch.randn(2, 4),), "float32",
                    torch.device("cpu"), backward=False)
    assert rows[0].original_ms > 0 and rows[0].swapped_ms > 0
    assert _CALLS.count("original") >= VERIFY_MIN_REPEATS and _CALLS.count("swapped") >= VERIFY_MIN_REPEATS
    assert _longest_run(_CALLS) <= 2, _CALLS


def test_verify_timing_leaves_the_callers_inputs_as_they_were():
    x = torch.randn(2, 3, 16, 16)
    report = fastattn.verify(discriminator(), x, dtypes=("float32",))
    assert report.timings and not x.requires_grad and x.grad is None
