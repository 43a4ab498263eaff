"""The Pareto sweep harness (issue 6): schema-valid JSON, resume, interpolation, verdict."""
from __future__ import annotations

import json

import jsonschema
import pytest

from moeca.bench import pareto

from conftest import make_tiny

SETTINGS = pareto.ParetoSettings(model="tiny", num_steps=8, cfg_scale=2.0, eval_samples=4, eval_batch=2,
                                 timing_batch=2, repeats=1, calibration_samples=2, trace_samples=2)
GRID = {"none": ("full", (1,)), "fora": ("interval", (2, 3)), "toca": ("fresh_threshold", (3,)),
        "teacache": ("thresh_x_mean_change", (2.0,)), "l2c": ("reuse_fraction", (0.5,))}


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    out = tmp_path_factory.mktemp("out")
    sweep = pareto.ParetoSweep(make_tiny(), SETTINGS, work, progress=False, log=lambda m: None)
    methods = list(GRID)
    rows = sweep.run(pareto.grid_points(methods, GRID))
    paths = pareto.write(SETTINGS, sweep.state, rows, methods, out, "moeca bench pareto --test", GRID)
    return sweep, rows, paths, work


def test_sweep_json_validates_against_its_schema(sweep_run):
    _, rows, paths, _ = sweep_run
    payload = json.loads(paths["json"].read_text())
    pareto.validate(payload)
    assert len(payload["rows"]) == 6 and {r["method"] for r in payload["rows"]} == set(GRID)
    assert paths["png"].stat().st_size > 0 and "| method |" in paths["md"].read_text()
    assert payload["meta"]["pending"] == [] and payload["meta"]["grid"]["fora"] == [2, 3]
    broken = json.loads(paths["json"].read_text())
    del broken["rows"][0]["speedup"]
    with pytest.raises(jsonschema.ValidationError):
        pareto.validate(broken)
    broken = json.loads(paths["json"].read_text())
    broken["rows"][0]["method"] = "magic"
    with pytest.raises(jsonschema.ValidationError):
        pareto.validate(broken)


def test_rows_measure_what_each_schedule_does(sweep_run):
    _, rows, _, _ = sweep_run
    by = {r["point"]: r for r in rows}
    full = by["none:full=1"]
    assert full["psnr"] == pareto.PSNR_CAP_DB and full["flops_ratio"] == pytest.approx(1.0)
    assert full["reuse_attn"] == 0 and full["reuse_expert"] == 0
    f2, f3 = by["fora:interval=2"], by["fora:interval=3"]
    assert f3["flops_ratio"] < f2["flops_ratio"] < 1
    assert f2["flops_ratio"] == pytest.approx(f2["predicted_flops_ratio"], rel=1e-6)
    assert f3["rel_l2"] > 0 and full["rel_l2"] == 0
    assert all(r["accuracy"] is None and r["fd"] is None for r in rows)  # tiny model: no digits classifier
    assert by["teacache:thresh_x_mean_change=2"]["detail"]["rel_l1_thresh"] > 0


def test_resume_skips_finished_points_and_refuses_other_settings(sweep_run, monkeypatch):
    _, rows, _, work = sweep_run
    again = pareto.ParetoSweep(make_tiny(), SETTINGS, work, resume=True, progress=False, log=lambda m: None)
    monkeypatch.setattr(again, "measure", lambda point: pytest.fail(f"{point.key} was measured again"))
    assert again.run(pareto.grid_points(list(GRID), GRID)) == rows
    other = pareto.ParetoSettings(**{**SETTINGS.__dict__, "repeats": 2})
    with pytest.raises(ValueError, match="repeats"):
        pareto.ParetoSweep(make_tiny(), other, work, resume=True, progress=False)


def test_interpolation_and_verdict():
    rows = [{"method": "moeca", "speedup": 1.5, "psnr": 40.0, "fd": 1.0},
            {"method": "moeca", "speedup": 3.5, "psnr": 30.0, "fd": 2.0},
            {"method": "toca", "speedup": 1.8, "psnr": 35.0, "fd": 1.5},
            {"method": "toca", "speedup": 2.6, "psnr": 25.0, "fd": 3.0},
            {"method": "fora", "speedup": 2.0, "psnr": 30.0, "fd": 1.2},
            {"method": "fora", "speedup": 3.0, "psnr": 20.0, "fd": 4.0}]
    assert pareto.interpolate(rows, "moeca", "psnr", 2.5) == pytest.approx(35.0)
    assert pareto.interpolate(rows, "toca", "psnr", 3.0) is None
    flops = [{**r, "flops_ratio": 1 / r["speedup"], "speedup": 1.0} for r in rows]
    assert pareto.interpolate(flops, "moeca", "psnr", 2.5, axis="flops") == pytest.approx(35.0)
    table = pareto.at_speedups(rows, ["moeca", "toca", "fora"])
    v = {x["speedup"]: x for x in pareto.verdict(table)}
    assert v["2x"]["psnr"] == "met"            # 37.5 vs toca 32.5, fora 30
    assert v["2x"]["fd"] == "not met"          # 1.25 vs fora 1.2
    assert "toca not reached" in v["3x"]["psnr"]


def test_points_are_round_robin_over_methods():
    keys = [p.key for p in pareto.grid_points(["fora", "toca"], {"fora": ("interval", (2, 3)),
                                                                 "toca": ("fresh_threshold", (4,))})]
    assert keys == ["fora:interval=2", "toca:fresh_threshold=4", "fora:interval=3"]


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="timing_batch"):
        pareto.ParetoSettings(eval_samples=4, timing_batch=8)
    with pytest.raises(ValueError, match="unknown method"):
        pareto.grid_points(["fora", "deepcache"])


def test_refresh_bench_schedules_are_valid_and_paired():
    """`moeca bench refresh`: every replay is a valid schedule; each forecast pair shares its refresh steps."""
    from conftest import TINY
    from moeca.bench import refresh
    from moeca.models.samplers import SamplerConfig
    from moeca.policy.schedule import validate_json

    sampler = SamplerConfig(kind="rectified_flow", num_steps=12, cfg_scale=1.5, cfg_mode="batched")
    rows = refresh.schedules(TINY, sampler)
    assert [g for g, _, _ in rows].count("sync") == 5 and {g for g, _, _ in rows} == {"forecast", "sync", "granularity"}
    for _, _, schedule in rows:
        validate_json(schedule.to_json())
    pairs = [r for r in rows if r[0] != "sync"]
    for (_, a_name, a), (_, b_name, b) in zip(pairs[::2], pairs[1::2]):
        assert a.sync_refresh_steps == b.sync_refresh_steps, (a_name, b_name)
        assert b.forecast == "linear"
