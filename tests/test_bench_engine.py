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
        # the floor with this core's kernels: it adds the pairs' GEMMs and the history reads to the token step
        assert row["ms_pair_gemms"] > 0 and row["ms_history_reads"] > 0
        assert token["ms_step"] + row["ms_pair_gemms"] + row["ms_history_reads"] <= row["ms_kernels"]
        assert row["over_kernels"] == pytest.approx(row["ms_step"] / row["ms_kernels"])
    assert host["ms_history_reads"] > routing_host["ms_history_reads"]        # 4 units a block against 2
    assert payload["meta"]["read_gb_per_s"] > 0
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
    expected = {"few_pairs": "new pairs", "sorted_swiglu": "new pairs", "shared_forecast": "forecasts",
                "routing_forecast": "forecasts", "_rows_forecast": "forecasts", "branch_block": "rest",
                "update_pairs": "gathers/scatters", "match_host": "gathers/scatters"}
    assert {f: frame_part(where + f) for f in expected} == expected


def test_kernel_floor_prices_the_reads_and_pairs_of_a_forecast_step():
    """The history a forecast step must read: kept values x units x blocks x ``[rows, D]`` float32; the new pairs
    spread over the experts at the rows per expert they come to."""
    from moeca.bench.kernel_floor import history_bytes, pairs_ms
    from moeca.models.registry import load_model

    model = load_model("demo")
    config = model.config                                    # 6 blocks, D 96, top-2, a shared expert
    assert history_bytes(config, 100, "branch") == 6 * (1 + 1 + 2) * 2 * 100 * 96 * 4
    assert history_bytes(config, 100, "routing") == 6 * 2 * 2 * 100 * 96 * 4
    ms, rows = pairs_ms(model, new_pairs=6 * 8 * 10)          # 80 pairs a block: ~10 rows for each of 8 experts
    assert rows == pytest.approx(10, abs=0.01) and ms > 0
    few, rows = pairs_ms(model, new_pairs=6 * 4)              # 4 pairs a block: ~3.3 experts of 8 touched
    assert rows == pytest.approx(4 / (8 * (1 - (7 / 8) ** 4))) and few < ms
    assert pairs_ms(model, new_pairs=0) == (0.0, 0.0)


def test_route_trigger_places_a_refresh_where_routes_changed_since_the_last_one():
    """The trigger refreshes at step 0 and then where the share of routed pairs not routed at the last refresh
    exceeds its threshold (routes compared per token as sets); the bisection finds the threshold for a count."""
    import numpy as np

    from moeca.bench.trigger import changed_share, even, place, placement_with

    base = np.array([[0, 1], [2, 3]])
    swapped = np.array([[1, 0], [2, 3]])                     # same sets, other slots: no change
    moved = np.array([[0, 5], [2, 3]])                        # one pair of four changed
    assert changed_share([swapped], [base], slice(None)) == 0.0
    assert changed_share([moved], [base], slice(None)) == 0.25
    assert changed_share([base, moved], [base, base], slice(0, 1)) == 0.0       # block 0 only
    routes = {0: [base], 1: [swapped], 2: [moved], 3: [moved], 4: [np.array([[4, 5], [6, 7]])]}
    assert place(routes, 0.2, slice(None)) == (0, 2, 4)      # 4 differs from 2 in three pairs of four
    assert place(routes, 0.9, slice(None)) == (0, 4)
    steps, threshold = placement_with(routes, 3, slice(None))
    assert steps == (0, 2, 4) and 0 <= threshold < 0.75
    assert even(50, 5) == (0, 10, 20, 30, 40)


def test_bench_trigger_replays_each_placement_with_as_many_refreshes_as_moeca(trace, tmp_path):
    out = tmp_path / "results"
    assert main(["bench", "trigger", "--trace", str(trace), "--targets", "1.5", "--timing-samples", "2",
                 "--quality-samples", "4", "--threads", "1", "--out", str(out)]) == 0
    payload = json.loads((out / "trigger_demo.json").read_text())
    rows = payload["rows"]
    assert [r["placement"] for r in rows] == ["moeca", "route trigger, block 0", "route trigger, all blocks", "even"]
    n = rows[0]["refreshes"]
    for row in rows:
        steps = [int(s) for s in row["refresh_steps"].split()]
        assert steps[0] == 0 and len(steps) == row["refreshes"] and abs(row["refreshes"] - n) <= 1
        assert row["psnr"] > 10 and row["flops_speedup"] > 1
    assert (out / "trigger_demo.md").exists() and (out / "trigger_demo.png").exists()


def test_bench_fit_refits_one_calibration_with_and_without_the_new_pair_coefficient(tmp_path):
    out = tmp_path / "results"
    assert main(["bench", "fit", "--model", "demo", "--batch", "1", "--steps", "5", "--repeats", "1", "--threads", "1",
                 "--out", str(out)]) == 0
    payload = json.loads((out / "fit_demo.json").read_text())
    rows = payload["rows"]
    fits = list(dict.fromkeys(r["fit"] for r in rows))
    assert fits == ["new pairs on their own (new_pair_ms)", "one rate for every pair"]
    for fit in fits:
        kinds = {r["kind"]: r for r in rows if r["fit"] == fit}
        assert set(kinds) == {"refresh", "token forecast", "branch/routing forecast", "one unit recomputed"}
        assert all(r["steps"] > 0 and r["median_abs_error"] >= 0 and r["fit_rel_error"] >= 0 for r in kinds.values())
    assert all(r["new_pair_ms"] == 0 for r in rows if r["fit"] == fits[1])      # no new pairs left to price
    assert (out / "fit_demo.md").exists() and (out / "fit_demo.png").exists()
