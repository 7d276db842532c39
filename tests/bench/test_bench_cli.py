"""`fastattn bench`: the command writes what it promises, records what cannot run, and compares runs."""
import json

import pytest
import torch

from fastattn import dispatch
from fastattn.bench import main
from fastattn.bench.report import compare

TINY = ["--custom", "N=48,M=12,d_qk=4,d_v=8,B=2", "--repeats", "3", "--min-time", "0", "--no-progress",
        "--threads", "1"]
REQUIRED = ("shape", "dtype", "direction", "provider", "median_s", "peak_bytes", "max_err")


def test_tiny_custom_case_writes_json_markdown_and_plots_with_required_fields(tmp_path, capsys):
    out = tmp_path / "run.json"
    status = main(TINY + ["--direction", "fwd,bwd,fwd+bwd", "--provider", "naive,sdpa,fastattn-torch",
                          "--json", str(out), "--markdown", str(tmp_path / "table.md"),
                          "--plots", str(tmp_path / "plots")])
    assert status == 0
    data = json.loads(out.read_text())
    for key in ("device", "cpu_model", "cpu_cores", "torch", "triton", "fastattn", "git_commit", "date",
                "cpu_memory_noise_floor_bytes"):
        assert key in data["env"], key
    records = data["records"]
    assert len(records) == 3 * 3
    for r in records:
        assert all(field in r for field in REQUIRED), r
        assert r["status"] == "ok", r
        assert 0 < r["q25_s"] <= r["median_s"] <= r["q75_s"]
        assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0
        assert r["max_err"] < 1e-4 and r["match"].startswith("OK"), r
        assert r["shape"] == "custom_N48_M12_dqk4_dv8" and r["B"] == 2
    naive = [r for r in records if r["provider"] == "naive"]
    assert all(r["time_vs_naive"] == 1.0 for r in naive)
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("Machine: CPU") and "| fastattn-torch |" in table
    for name in ("time_vs_flops.png", "memory_vs_pairs.png", "time_vs_naive_per_site.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| naive |" in capsys.readouterr().out
    # the README's table is regenerated from committed results without rerunning anything
    assert main(["--from-json", str(out), "--markdown", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == table


class _RefusingBackend(dispatch.Backend):
    name = "triton"

    def unavailable(self):
        return ["no GPU in this test"]

    def unsupported(self, q, k, v):
        return []

    def attention(self, q, k, v, scale):  # pragma: no cover - never reached
        raise AssertionError("a refusing backend must not run")


def test_providers_that_cannot_run_are_recorded_with_their_reason_not_raised(tmp_path, monkeypatch):
    dispatch.available_backends()  # load the built-ins, then stand in for the Triton backend
    monkeypatch.setitem(dispatch._REGISTRY, "triton", _RefusingBackend())
    out = tmp_path / "run.json"
    providers = "naive,fastattn-triton,sdpa-efficient" if not torch.cuda.is_available() else "naive,fastattn-triton"
    assert main(TINY + ["--direction", "fwd", "--provider", providers, "--no-memory", "--json", str(out)]) == 0
    records = {r["provider"]: r for r in json.loads(out.read_text())["records"]}
    assert records["naive"]["status"] == "ok"
    assert records["fastattn-triton"]["status"] == "not supported"
    assert "no GPU in this test" in records["fastattn-triton"]["reason"]
    assert records["fastattn-triton"]["median_s"] is None
    if "sdpa-efficient" in records:
        assert records["sdpa-efficient"]["status"] == "not supported"
        assert "CUDA" in records["sdpa-efficient"]["reason"]


def _slowed(data: dict, providers: tuple[str, ...], factor: float) -> dict:
    """A copy of a run in which the given providers were `factor` times faster (so the run being
    compared looks `factor` times slower)."""
    old = json.loads(json.dumps(data))
    for r in old["records"]:
        if r["provider"] in providers:
            for field in ("median_s", "q25_s", "q75_s"):
                r[field] /= factor
    return old


def test_compare_flags_every_injected_slowdown_and_fail_on_regression_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run without --json writes its default results file here
    new = tmp_path / "new.json"
    assert main(TINY + ["--direction", "fwd", "--provider", "naive,fastattn-torch", "--no-memory",
                        "--no-check", "--json", str(new)]) == 0
    data = json.loads(new.read_text())
    old = tmp_path / "old.json"
    # 1000x: far beyond any within-run spread, even on a loaded machine (seen up to 12x)
    old.write_text(json.dumps(_slowed(data, ("naive", "fastattn-torch"), 1000.0)))
    capsys.readouterr()
    status = main(TINY + ["--direction", "fwd", "--provider", "naive,fastattn-torch", "--no-memory",
                          "--no-check", "--compare", str(old), "--fail-on-regression"])
    printed = capsys.readouterr().out
    assert status == 1
    assert "2 regression(s)" in printed  # both, not "all but one"

    _, regressions = compare(data, data["records"])
    assert regressions == []
    _, regressions = compare(_slowed(data, ("fastattn-torch",), 1000.0), data["records"])
    assert len(regressions) == 1 and "fastattn-torch" in regressions[0]


def test_compare_counts_a_case_that_stopped_running_and_ignores_noise_sized_changes():
    base = {"shape": "s", "B": 1, "N": 4, "M": 4, "d_qk": 2, "d_v": 2, "dtype": "float32",
            "direction": "fwd", "status": "ok", "reason": None, "match": "OK"}
    old = {"records": [{**base, "provider": "a", "median_s": 1.0, "q25_s": 0.9, "q75_s": 1.1},
                       {**base, "provider": "b", "median_s": 1.0, "q25_s": 0.9, "q75_s": 1.1}]}
    new = [{**base, "provider": "a", "median_s": 1.1, "q25_s": 1.0, "q75_s": 1.2},  # within noise
           {**base, "provider": "b", "status": "error", "reason": "boom", "median_s": None}]
    table, regressions = compare(old, new)
    assert len(regressions) == 1 and "now error: boom" in regressions[0]
    assert "same (within noise)" in table


def test_compare_matches_a_case_run_at_another_batch_by_time_per_sample():
    base = {"shape": "s", "N": 4, "M": 4, "d_qk": 2, "d_v": 2, "dtype": "float32", "direction": "fwd",
            "provider": "a", "status": "ok", "reason": None, "match": "OK"}
    old = {"records": [{**base, "B": 4, "median_s": 1.0, "q25_s": 0.95, "q75_s": 1.05}]}
    same_per_sample = [{**base, "B": 2, "median_s": 0.5, "q25_s": 0.48, "q75_s": 0.52}]
    ten_times_slower = [{**base, "B": 2, "median_s": 5.0, "q25_s": 4.9, "q75_s": 5.1}]
    assert compare(old, same_per_sample)[1] == []
    table, regressions = compare(old, ten_times_slower)
    assert len(regressions) == 1 and "s B=2" in regressions[0]


def test_compare_fails_when_nothing_was_timed_in_both_runs():
    base = {"N": 4, "M": 4, "d_qk": 2, "d_v": 2, "dtype": "float32", "direction": "fwd", "provider": "a",
            "B": 1, "status": "ok", "reason": None, "match": "OK", "median_s": 1.0, "q25_s": 0.9, "q75_s": 1.1}
    _, regressions = compare({"records": [{**base, "shape": "old_site"}]}, [{**base, "shape": "new_site"}])
    assert len(regressions) == 1 and "nothing was compared" in regressions[0]


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "nope"], "--shape must name sites from gan_shapes.json"),
    (["--dtype", "fp8"], "--dtype must be one of float32"),
    (["--direction", "sideways"], "--direction must be one of fwd, bwd, fwd+bwd, fwd+bwd+bwd2, got 'sideways'"),
    (["--provider", "magic"], "--provider must be one of naive"),
    (["--custom", "N=0,M=4,d_qk=2,d_v=2"], "--custom got 'N=0,M=4,d_qk=2,d_v=2': bad item 'N=0'"),
    (["--custom", "N=8,M=4"], "missing d_qk, d_v"),
    (["--fail-on-regression"], "--fail-on-regression needs --compare"),
    (["--compare", "/nonexistent/old.json"], "--compare: cannot read /nonexistent/old.json"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--preset", "train-step", "--provider", "sdpa"], "--provider does not apply to it"),
    (["--preset", "train-step", "--resolution", "100"], "--resolution must be powers of two >= 16"),
    (["--resolution", "128"], "--resolution and --ch apply to --preset train-step only"),
])
def test_bad_arguments_exit_2_naming_the_argument_and_what_was_expected(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_compare_rejects_a_file_that_is_not_a_bench_result(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(SystemExit):
        main(["--compare", str(path)])
    assert "is not a `fastattn bench --json` file" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stress preset is checked here")
def test_cpu_stress_preset_lists_the_high_resolution_and_wide_head_sites_at_batch_1_without_running(capsys):
    assert main(["--preset", "stress", "--provider", "naive", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "biggan256_G128 B=1 float32 fwd naive  [B 64 -> 1 (stress preset)]",
        "biggan256_G128 B=1 float32 fwd+bwd naive  [B 64 -> 1 (stress preset)]",
        "stress_unpooled128 B=1 float32 fwd naive",
        "stress_unpooled128 B=1 float32 fwd+bwd naive",
        "autoencoder_mid512 B=1 float32 fwd naive  [B 8 -> 1 (stress preset)]",
        "autoencoder_mid512 B=1 float32 fwd+bwd naive  [B 8 -> 1 (stress preset)]",
    ]


def test_spread_flags_unstable_timings_and_the_table_says_so():
    from fastattn.bench.measure import is_unstable, spread
    from fastattn.bench.report import add_derived, markdown_table
    from fastattn.constants import BENCH_STABLE_SPREAD

    assert spread(0.9, 1.0, 1.1) == pytest.approx(0.2) and spread(1.0, 1.0, 1.0) == 0.0
    assert not is_unstable(BENCH_STABLE_SPREAD) and is_unstable(BENCH_STABLE_SPREAD + 1e-9)
    base = {"shape": "s", "B": 1, "N": 4, "M": 4, "d_qk": 2, "d_v": 2, "dtype": "float32", "direction": "fwd",
            "status": "ok", "peak_bytes": None}
    records = [{**base, "provider": "naive", "median_s": 1.0, "q25_s": 0.99, "q75_s": 1.01},
               {**base, "provider": "fastattn-torch", "median_s": 0.5, "q25_s": 0.1, "q75_s": 40.0}]
    add_derived(records, {"device_type": "cpu"})
    assert [r["unstable"] for r in records] == [False, True]
    assert records[1]["time_vs_naive"] == 0.5  # one convention: provider time / naive time
    table = markdown_table(records, {"device_type": "cpu"})
    assert "time vs naive" in table and "speedup" not in table
    assert table.count("UNSTABLE") == 1


def test_timing_repeats_past_the_minimum_while_the_spread_is_too_wide(monkeypatch):
    from itertools import cycle

    from fastattn.bench import measure

    monkeypatch.setattr(measure, "BENCH_MAX_TIME_FACTOR", 10**6)
    durations = cycle([0.0, 0.002])  # bimodal: never stable, so it runs to max_repeats
    import time as _time

    def call(_):
        _time.sleep(next(durations))
    timing, _ = measure.time_call(lambda: None, call, torch.device("cpu"), min_time_s=1e-3, min_repeats=3,
                                  max_repeats=9)
    assert timing.n_repeats == 9 and timing.unstable
    steady, _ = measure.time_call(lambda: None, lambda _: _time.sleep(0.003), torch.device("cpu"),
                                  min_time_s=1e-3, min_repeats=3, max_repeats=50)
    assert steady.n_repeats < 50


def test_default_run_writes_json_and_markdown_and_names_them_on_the_last_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(TINY + ["--direction", "fwd", "--provider", "naive,fastattn-torch", "--no-memory"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("results: fastattn-bench-results/") and " and " in last and "threads" in last
    json_path, md_path = last.split()[1], last.split()[3]
    data = json.loads((tmp_path / json_path).read_text())
    assert data["env"]["torch_threads"] == 1 and "load_average_at_start" in data["env"]
    assert (tmp_path / md_path).read_text().startswith("Machine: CPU")
