"""The Pareto protocol (issue 12): schema-valid results per model, two noise seeds with their spread,
warm-up of every method, weights hash in every cache key, resume, fronts, interpolation, comparison."""
from __future__ import annotations

import json

import jsonschema
import pytest

from moeca.bench import pareto
from moeca.policy.methods.l2c import L2CRouter

from conftest import make_tiny

SETTINGS = pareto.ParetoSettings(model="tiny", num_steps=8, cfg_scale=2.0, eval_samples=4, eval_batch=2,
                                 timing_batch=2, repeats=2, calibration_samples=2, trace_samples=2,
                                 l2c_max_iterations=4)
GRID = {"none": ({},), "fora": ({"interval": 2}, {"interval": 3}), "taylorseer": ({"interval": 3, "order": 2},),
        "toca": ({"fresh_ratio": 0.2, "fresh_threshold": 3},), "teacache": ({"thresh_x_mean_change": 2.0},),
        "l2c": ({"sparsity": 0.01, "threshold": 0.9},), "fbcache": ({"threshold": 0.5},),
        "magcache": ({"threshold": 1.0},)}


def quiet(model, work, **kw):
    return pareto.ParetoSweep(model, SETTINGS, work, progress=False, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    out = tmp_path_factory.mktemp("out")
    sweep = quiet(make_tiny(), work)
    methods = list(GRID)
    rows = sweep.run(pareto.grid_points(methods, GRID))
    paths = pareto.write(sweep.info, rows, methods, out, "moeca bench pareto --test", GRID)
    return sweep, rows, paths, work


def test_results_are_named_per_model_and_validate_against_their_schema(sweep_run):
    sweep, rows, paths, _ = sweep_run
    assert paths["json"].name == "pareto_tiny.json" and paths["png"].name == "pareto_tiny.png"
    payload = json.loads(paths["json"].read_text())
    pareto.validate(payload)
    assert len(payload["rows"]) == 9 and {r["method"] for r in payload["rows"]} == set(GRID)
    meta = payload["meta"]
    assert meta["weights_hash"] == sweep.weights_hash and meta["sampler"]["kind"] == "rectified_flow"
    assert meta["pending"] == [] and meta["grid"]["toca"] == [{"fresh_ratio": 0.2, "fresh_threshold": 3}]
    assert meta["code"]["schedule_format"] >= 3
    md = paths["md"].read_text()
    assert "| method |" in md and " ± " in md and sweep.weights_hash in md
    broken = json.loads(paths["json"].read_text())
    del broken["rows"][0]["psnr_spread"]
    with pytest.raises(jsonschema.ValidationError):
        pareto.validate(broken)
    broken = json.loads(paths["json"].read_text())
    broken["rows"][0]["method"] = "magic"
    with pytest.raises(jsonschema.ValidationError):
        pareto.validate(broken)


def test_rows_measure_each_schedule_on_two_seeds_with_their_spread(sweep_run):
    _, rows, _, _ = sweep_run
    by = {r["point"]: r for r in rows}
    full = by["none:full"]
    assert full["psnr"] == pareto.PSNR_CAP_DB and full["psnr_spread"] == 0 and full["flops_ratio"] == pytest.approx(1.0)
    f2, f3 = by["fora:interval=2"], by["fora:interval=3"]
    assert f3["flops_ratio"] < f2["flops_ratio"] < 1
    # counted = predicted compute + the folded stack forecast's rows (2 D FLOPs each), which the prediction leaves out
    assert f2["predicted_flops_ratio"] < f2["flops_ratio"] < 1.01 * f2["predicted_flops_ratio"]
    for r in rows:
        a, b = r["per_seed"]["psnr"]
        assert r["psnr"] == pytest.approx((a + b) / 2) and r["psnr_spread"] == pytest.approx(abs(a - b) / 2)
        ratios = [f / c for f, c in zip(r["times_full_s"], r["times_cached_s"])]
        assert len(ratios) == SETTINGS.repeats and r["speedup_spread"] == pytest.approx((max(ratios) - min(ratios)) / 2)
    a, b = f3["per_seed"]["rel_l2"]
    assert a > 0 and b > 0 and a != b                       # two different noise seeds, both cached
    ts = by["taylorseer:interval=3,order=2"]
    assert ts["flops_ratio"] < 1 and ts["params"] == {"interval": 3.0, "order": 2.0}
    assert all(r["accuracy"] is None and r["fd"] is None for r in rows)  # tiny model: no digits classifier
    assert by["teacache:thresh_x_mean_change=2"]["detail"]["rel_l1_thresh"] > 0


def test_every_method_is_warmed_up_and_timed_interleaved(tmp_path, monkeypatch):
    calls = []
    real = pareto.replay_compare

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pareto, "replay_compare", spy)          # the name the sweep calls
    sweep = quiet(make_tiny(), tmp_path)
    sweep.run(pareto.grid_points(["none", "fora"], {"none": ({},), "fora": ({"interval": 2},)}))
    assert len(calls) == 2 and all(c["warmup"] is True and c["repeats"] == SETTINGS.repeats for c in calls)


def test_resume_skips_finished_points_and_refuses_other_settings(sweep_run, monkeypatch):
    _, rows, _, work = sweep_run
    again = quiet(make_tiny(), work, resume=True)
    monkeypatch.setattr(again, "measure", lambda point: pytest.fail(f"{point.key} was measured again"))
    assert again.run(pareto.grid_points(list(GRID), GRID)) == rows
    other = pareto.ParetoSettings(**{**SETTINGS.__dict__, "repeats": 3})
    with pytest.raises(ValueError, match="repeats"):
        pareto.ParetoSweep(make_tiny(), other, work, resume=True, progress=False)


def test_retrained_weights_never_reuse_cached_results(sweep_run, monkeypatch):
    """Same settings, same work folder, new weights (a retrained checkpoint at the same path): resume is
    refused, and every cached artefact (references, TeaCache fit, L2C router, trace) gets a new key."""
    sweep, _, _, work = sweep_run
    retrained = make_tiny(seed=1)
    with pytest.raises(ValueError, match="weights_hash"):
        quiet(retrained, work, resume=True)
    before = {p.name for p in work.iterdir()}
    fresh = quiet(retrained, work)
    assert fresh.weights_hash != sweep.weights_hash
    assert fresh.cache_key("l2c-router") != sweep.cache_key("l2c-router")
    assert all(fresh.settings.reference_key(s, fresh.weights_hash) != sweep.settings.reference_key(s, sweep.weights_hash)
               for s in SETTINGS.seeds)
    fit = fresh.teacache_fit()
    router = L2CRouter.load(fresh.l2c_router())
    fresh.context()
    added = {p.name for p in work.iterdir()} - before
    assert {n.split("-")[0] for n in added} >= {"reference", "teacache", "l2c"}
    assert fit["weights_hash"] == fresh.weights_hash and router.meta["weights_hash"] == fresh.weights_hash
    assert fit["coefficients"] != sweep.teacache_fit()["coefficients"]


def test_front_keeps_the_best_point_per_speed_and_interpolates_with_spread():
    rows = [{"method": "toca", "speedup": 2.0, "psnr": 30.0, "psnr_spread": 1.0},
            {"method": "toca", "speedup": 2.2, "psnr": 25.0, "psnr_spread": 0.5},   # dominated by the next
            {"method": "toca", "speedup": 2.5, "psnr": 28.0, "psnr_spread": 3.0},
            {"method": "toca", "speedup": 4.0, "psnr": 20.0, "psnr_spread": 1.0}]
    assert [r["speedup"] for r in pareto.front(rows, "toca", "psnr")] == [2.0, 2.5, 4.0]
    value, spread = pareto.interpolate(rows, "toca", "psnr", 2.25)
    assert value == pytest.approx(29.0) and spread == pytest.approx(2.0)
    assert pareto.interpolate(rows, "toca", "psnr", 5.0) is None
    assert pareto.interpolate(rows, "toca", "psnr", 1.5) == (30.0, 1.0)   # a faster setting reaches 1.5x
    fd = [{**r, "fd": 40 - r["psnr"], "fd_spread": 0.0} for r in rows]   # lower is better
    assert [r["speedup"] for r in pareto.front(fd, "toca", "fd")] == [2.0, 2.5, 4.0]
    flops = [{**r, "flops_ratio": 1 / r["speedup"], "speedup": 1.0} for r in rows]
    assert pareto.interpolate(flops, "toca", "psnr", 2.25, axis="flops")[0] == pytest.approx(29.0)


def test_comparison_states_wins_losses_and_noise():
    def cell(psnr, spread, fd=None):
        return {"psnr": psnr, "psnr_spread": spread, "ssim": None, "ssim_spread": None, "accuracy": None,
                "accuracy_spread": None, "fd": fd, "fd_spread": None if fd is None else 0.1}
    table = {"moeca": {"2x": cell(40.0, 0.5, 3.0), "3x": cell(30.0, 0.5)},
             "taylorseer": {"2x": cell(45.0, 0.5, 3.05), "3x": cell(29.0, 1.0)},
             "fora": {"2x": cell(35.0, 0.1, 4.0), "3x": cell(None, None)}}
    got = {(c["speedup"], c["metric"]): c for c in pareto.comparison(table, (2.0, 3.0))}
    assert got[("2x", "psnr")]["verdict"] == "loses" and got[("2x", "psnr")]["best"] == "taylorseer"
    assert got[("2x", "fd")]["verdict"] == "within noise" and got[("2x", "fd")]["best"] == "taylorseer"
    assert got[("3x", "psnr")]["verdict"] == "within noise"            # +1 dB against 0.5 + 1.0 spread
    assert got[("3x", "fd")]["verdict"] == "moeca not reached"


def test_points_are_round_robin_over_methods_with_every_knob():
    keys = [p.key for p in pareto.grid_points(["fora", "toca"], {"fora": ({"interval": 2}, {"interval": 3}),
                                                                 "toca": ({"fresh_ratio": 0.07, "fresh_threshold": 4},)})]
    assert keys == ["fora:interval=2", "toca:fresh_ratio=0.07,fresh_threshold=4", "fora:interval=3"]
    assert pareto.grid_points(["none", "fora"], {"none": ({},), "fora": ({"interval": 2},)})[-1].key == "none:full"
    default = pareto.grid_points(list(pareto.DEFAULT_METHODS))
    assert {p.method for p in default} == set(pareto.DEFAULT_METHODS) and "fora-forecast" not in pareto.METHODS
    toca = [p for p in default if p.method == "toca"]
    assert len({p["fresh_ratio"] for p in toca}) > 1 and len({p["fresh_threshold"] for p in toca}) > 1
    ts = [p for p in default if p.method == "taylorseer"]
    assert {p["order"] for p in ts} >= {1, 2} and len({p["interval"] for p in ts}) > 1


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="seeds"):
        pareto.ParetoSettings(seeds=(0, 0))
    with pytest.raises(ValueError, match="eval_samples"):
        pareto.ParetoSettings(eval_samples=0)
    with pytest.raises(ValueError, match="unknown method"):
        pareto.grid_points(["fora", "deepcache"])
    assert pareto.ParetoSettings().eval_samples * len(pareto.ParetoSettings().seeds) >= 300


def test_refresh_bench_schedules_are_valid_and_paired():
    """`moeca bench refresh`: every replay is a valid schedule; each forecast pair shares its refresh steps."""
    from conftest import TINY
    from moeca.bench import refresh
    from moeca.diffusion.samplers import SamplerConfig
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


def test_a_ddpm_model_is_swept_with_its_own_sampler(tmp_path):
    """An epsilon-prediction model with learned variance (the demo-ddpm recipe) gets the respaced DDPM
    sampler; its TeaCache fit and every method run through the same protocol."""
    import dataclasses

    from conftest import TINY
    ddpm = make_tiny(dataclasses.replace(TINY, learn_sigma=True, objective="ddpm_eps"))
    sweep = quiet(ddpm, tmp_path)
    assert (sweep.sampler.kind, sweep.sampler.num_steps) == ("ddpm", SETTINGS.num_steps)
    grid = {"none": ({},), "taylorseer": ({"interval": 3, "order": 2},), "teacache": ({"thresh_x_mean_change": 2.0},)}
    rows = sweep.run(pareto.grid_points(list(grid), grid))
    assert {r["method"] for r in rows} == set(grid) and all(r["psnr"] > 0 for r in rows)
    paths = pareto.write(sweep.info, rows, list(grid), tmp_path / "out", "test", grid)
    payload = json.loads(paths["json"].read_text())
    pareto.validate(payload)
    assert payload["meta"]["sampler"]["kind"] == "ddpm"


def test_moeca_points_derive_for_measured_speed_with_the_sweeps_calibration(sweep_run, monkeypatch):
    """``moeca`` derives for wall-clock targets (what ``moeca schedule derive --target-speedup`` does) from
    the sweep's own trace and a calibration at the timing batch, recorded in the state; the ablations change
    one ingredient each: branch level, even placement, no forecast, the FLOPs-only budget rule. (The
    calibration is hand-set here, so the derivations do not depend on this machine's timing.)"""
    from moeca.policy.wallclock import WallClockCosts
    from moeca.replay import calibrate
    sweep = sweep_run[0]
    rows = calibrate.rows_per_block(sweep.model.config, sweep.sampler, SETTINGS.timing_batch)
    fixed = WallClockCosts(step_ms=1.0, attn_row_ms=0.01, shared_row_ms=0.01, pair_ms=0.01, forecast_term_ms=0.001,
                           history_term_ms=0.001, router_block_ms=0.1, full_step_ms=1.0 + rows * 0.05,
                           rows_per_block=rows, top_k=sweep.model.config.top_k,
                           key=calibrate.calibration_key(sweep.model, sweep.sampler, SETTINGS.timing_batch))
    monkeypatch.setattr(pareto, "ensure_costs", lambda model, sampler, batch, **kw: fixed)  # the name the sweep calls
    assert set(pareto.ABLATIONS) == {"moeca-branch", "moeca-even", "moeca-plain", "moeca-budget"}
    assert not set(pareto.ABLATIONS) & set(pareto.DEFAULT_METHODS)
    point = lambda m, t: pareto.Point(m, (("target_speedup", t),))
    moeca, detail = sweep.schedule_for(point("moeca", 1.5))
    assert moeca.provenance["config"]["target"] == "wallclock" and detail["predicted_speedup"] == pytest.approx(
        moeca.provenance["predicted_speedup"]) and detail["refresh_steps"] == len(moeca.sync_refresh_steps)
    cal = sweep.state.calibration("wallclock")
    assert cal["key"]["batch"] == str(SETTINGS.timing_batch) and cal["key"]["weights"] == sweep.weights_hash
    branch, _ = sweep.schedule_for(point("moeca-branch", 1.5))
    assert branch.provenance["forecast_level"] == "branch"
    assert len(branch.sync_refresh_steps) <= len(moeca.sync_refresh_steps)
    even, _ = sweep.schedule_for(point("moeca-even", 1.5))
    assert even.provenance["config"]["placement"] == "even"
    plain, _ = sweep.schedule_for(point("moeca-plain", 1.5))
    assert plain.forecast == "none"
    budget, _ = sweep.schedule_for(point("moeca-budget", 1.5))
    assert budget.provenance["config"]["target"] == "flops"


def test_l2c_points_train_one_router_per_sparsity(sweep_run):
    """L2C's speed knob is its training's sparsity penalty: each sparsity of the grid gets its own router
    (its own cached file and calibration entry), a larger penalty reuses more."""
    sweep = sweep_run[0]
    low = L2CRouter.load(sweep.l2c_router(0.0001))
    high = L2CRouter.load(sweep.l2c_router(1.0))
    routers = sweep.state.calibration("l2c_routers")
    assert {"0.0001", "1", "0.01"} <= set(routers) and routers["0.0001"]["file"] != routers["1"]["file"]
    assert high.beta[1::2].mean() < low.beta[1::2].mean()


def test_whole_model_skips_are_measured_with_their_calibration(sweep_run):
    _, rows, _, _ = sweep_run
    by = {r["point"]: r for r in rows}
    assert by["magcache:threshold=1"]["detail"]["skipped_steps"] > 0
    assert by["magcache:threshold=1"]["skipped_forwards"] > 0
    assert len(sweep_run[0].state.calibration("magcache_ratios")["mag_ratios"]) == SETTINGS.num_steps
    assert by["fbcache:threshold=0.5"]["flops_ratio"] <= 1.0


def test_table_cells_report_the_fd_of_the_points_whose_psnr_is_shown():
    """The best-PSNR point at 2x is the 2x point (FD 22.5); a faster point with a lower FD (21.6) must not
    lend its FD to the 2x cell."""
    rows = [{"method": "moeca", "speedup": 2.0, "psnr": 57.0, "psnr_spread": 0.1, "fd": 22.5, "fd_spread": 0.2},
            {"method": "moeca", "speedup": 3.0, "psnr": 51.0, "psnr_spread": 0.1, "fd": 23.5, "fd_spread": 0.2},
            {"method": "moeca", "speedup": 5.0, "psnr": 43.0, "psnr_spread": 0.1, "fd": 21.6, "fd_spread": 0.2}]
    table = pareto.at_speedups(rows, ["moeca"], (2.0, 2.5, 4.0))["moeca"]
    assert table["2x"]["psnr"] == 57.0 and table["2x"]["fd"] == 22.5
    assert table["2.5x"]["fd"] == pytest.approx(23.0)           # halfway between the 2x and 3x points
    assert table["4x"]["psnr"] == pytest.approx(47.0) and table["4x"]["fd"] == pytest.approx(22.55)


def test_ablation_plot_draws_measured_rows_and_skips_unreached_targets(tmp_path):
    """``moeca bench ablation`` writes a PNG: PSNR against measured speedup per variant; a variant whose
    target was out of reach (no measurement) is left out instead of failing the plot."""
    from PIL import Image

    from moeca.bench import ablation
    rows = [{"target": "2x", "variant": v, "speedup": 2.0 + i / 10, "psnr": 50.0 - i} for i, (v, _) in
            enumerate(ablation.VARIANTS)]
    rows.append({"target": "3x", "variant": "branch level", "note": "target speedup 3x is out of reach"})
    path = tmp_path / "ablation.png"
    ablation.plot(rows, path)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300
