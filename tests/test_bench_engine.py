"""``moeca bench compile`` (eager and compiled runs timed in one process; backend ``eager`` here: dynamo
traces the graphs without generating code, so the flow runs in seconds) and ``moeca bench steps`` (ms per
forecast step at the token and the branch level, host and device path, against the branch step's floor)."""
from __future__ import annotations

import json

import pytest

from moeca.cli.main import main


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-engine") / "trace"
    assert main(["trace", "--model", "demo", "--steps", "10", "--samples", "4", "--cfg-scale", "1.5",
                 "--out", str(path), "--no-progress"]) == 0
    return path


def test_bench_compile_times_eager_and_compiled_in_one_process(trace, tmp_path):
    out = tmp_path / "results"
    assert main(["bench", "compile", "--trace", str(trace), "--target", "1.5", "--timing-samples", "2",
                 "--repeats", "1", "--threads", "1", "--backend", "eager", "--out", str(out)]) == 0
    payload = json.loads((out / "compile.json").read_text())
    full, cached = payload["rows"]
    assert full["run"] == "full compute" and cached["run"].startswith("moeca 1.5x")
    for row in (full, cached):
        assert row["ms_eager"] > 0 and row["ms_compiled"] > 0 and row["compile_speedup"] > 0
        assert row["graphs"] >= 1                     # the warm-up compiled the kinds of step
        assert row["max_abs_diff"] < 1e-4              # the compiled forward gives the eager numbers
    assert cached["speedup_eager"] > 0 and cached["speedup_compiled"] > 0
    assert payload["meta"]["backend"] == "eager" and "--backend eager" in payload["command"]
    assert (out / "compile.md").exists() and (out / "compile.png").exists()


def test_bench_steps_prices_each_levels_forecast_step_against_its_floor(trace, tmp_path):
    out = tmp_path / "results"
    assert main(["bench", "steps", "--trace", str(trace), "--target", "2", "--timing-samples", "2",
                 "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    payload = json.loads((out / "steps.json").read_text())
    full, token, host_general, device_general, host, device, routing_host, routing_device = payload["rows"]
    assert len(payload["meta"]["sync_refresh_steps"]) >= 3 and payload["meta"]["forecast_steps"]
    assert full["run"] == "full compute" and full["ms_step"] > 0 and full["gflop_step"] > 0
    assert token["run"] == "token forecast" and 0 < token["ms_step"] < full["ms_step"]
    for row, name in ((host, "branch, host path forecast"), (device, "branch, device path forecast"),
                      (host_general, "branch, host path, general forecast"),
                      (device_general, "branch, device path, general forecast"),
                      (routing_host, "routing, host path forecast"), (routing_device, "routing, device path forecast")):
        assert row["run"] == name and row["ms_step"] > 0 and row["ms_refresh"] > 0
        # the floor: the token step plus the router and new pairs at full compute's rate
        assert token["ms_step"] < row["ms_floor"] < full["ms_step"]
        assert row["over_floor"] == pytest.approx(row["ms_step"] / row["ms_floor"])
        assert 0 < row["new_pair_share"] < 0.5 and token["gflop_step"] < row["gflop_step"] < full["gflop_step"]
    parts = [host[c] for c in ("ms_router", "ms_new_pairs", "ms_forecasts", "ms_gathers", "ms_rest")]
    assert min(parts) >= 0 and sum(parts) == pytest.approx(host["ms_step"])
    assert parts[0] > 0 and parts[1] > 0 and parts[2] > 0
    assert (out / "steps.md").exists() and (out / "steps.png").exists()


def test_bench_steps_without_a_trace_and_on_cpu_time(tmp_path):
    out = tmp_path / "results"
    assert main(["bench", "steps", "--model", "demo", "--steps", "9", "--interval", "3", "--timing-samples", "1",
                 "--repeats", "1", "--threads", "1", "--clock", "cpu", "--out", str(out)]) == 0
    payload = json.loads((out / "steps_demo.json").read_text())
    assert not payload["meta"]["random_init"] and payload["meta"]["clock"] == "cpu"
    assert payload["meta"]["sync_refresh_steps"] == [0, 3, 6] and "--clock cpu" in payload["command"]
    assert payload["meta"]["forecast_steps"] == [4, 5, 7, 8] and len(payload["rows"]) == 8
    assert "--model demo --steps 9 --interval 3" in payload["command"]


def test_breakdown_files_the_lean_and_routing_steps_functions_under_their_parts():
    """Each engine function of the lean branch and routing-aware steps is filed under the part it does (the
    innermost named frame decides), so a bench steps breakdown does not count the new pairs' GEMMs as gathers."""
    from moeca.bench.breakdown import frame_part

    where = "/x/moeca/replay/units/branch.py(10): "
    expected = {"few_pairs": "new pairs", "padded_swiglu": "new pairs", "shared_forecast": "forecasts",
                "routing_forecast": "forecasts", "_rows_forecast": "forecasts", "branch_block": "rest",
                "update_pairs": "gathers/scatters", "match_host": "gathers/scatters"}
    assert {f: frame_part(where + f) for f in expected} == expected
