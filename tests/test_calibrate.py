"""Wall-clock calibration: the cache file, its key, the measurement and the prediction printed by replay."""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import replace

import pytest
import torch

from moeca.diffusion.samplers import SamplerConfig
from moeca.policy.wallclock import (COEFFICIENTS, CalibrationError, StepWork, WallClockCosts, cache_path, key_id,
                                    load_costs, save_costs)
from moeca.replay import calibrate as cal

from conftest import TINY, make_tiny

SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=8, cfg_scale=1.5, cfg_mode="batched")
KEY = {"device": "cpu:test", "torch": "2.13.0", "engine": "abc", "weights": "w", "model": "m", "batch": "2",
       "dtype": "float32", "sampler": "rectified_flow", "cfg_mode": "batched", "threads": "1"}


def costs(key=KEY, **over) -> WallClockCosts:
    base = dict(step_ms=2.0, attn_row_ms=0.01, shared_row_ms=0.005, pair_ms=0.004,
                forecast_term_ms=0.0002, history_term_ms=0.0003, router_block_ms=0.05, full_step_ms=9.0, rows_per_block=64, top_k=2,
                key=key, fit_rel_error=0.05, created="2026-01-01T00:00:00Z")
    return WallClockCosts(**{**base, **over})


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MOECA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "moeca" / "calibration.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path() == tmp_path / "home" / ".cache" / "moeca" / "calibration.json"


def test_round_trip_keeps_every_entry_and_writes_atomically(cache_dir):
    a, b = costs(), costs(key={**KEY, "batch": "16"}, step_ms=7.5)
    path = save_costs(a)
    save_costs(b)
    assert path == cache_dir / "calibration.json"
    assert load_costs(KEY) == a and load_costs(b.key) == b
    assert sorted(p.name for p in cache_dir.iterdir()) == [".calibration.json.lock", "calibration.json"]  # no temporary
    data = json.loads(path.read_text())
    assert data["format"] == 1 and set(data["entries"]) == {key_id(a.key), key_id(b.key)}
    save_costs(replace(a, step_ms=3.0))                                             # same key: replaced
    assert load_costs(KEY).step_ms == 3.0 and len(json.loads(path.read_text())["entries"]) == 2


def _save_many(path: str, tag: str, count: int) -> None:
    for i in range(count):
        save_costs(costs({**KEY, "batch": f"{tag}{i}"}), Path(path))


def test_processes_saving_at_once_keep_each_others_entries(cache_dir):
    """Two processes calibrating at the same time (e.g. two benchmark sweeps) both keep their entries: each
    read-modify-write of the cache holds a lock."""
    import multiprocessing
    path = cache_dir / "calibration.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_save_many, args=(str(path), tag, 30)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 60
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]


def test_another_key_is_never_used(cache_dir):
    save_costs(costs())
    for field in ("engine", "torch", "device", "weights", "batch", "dtype", "threads"):
        assert load_costs({**KEY, field: "other"}) is None, field


def test_bad_cache_files_and_entries_name_the_problem(cache_dir):
    cache_dir.mkdir()
    path = cache_dir / "calibration.json"
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="is not valid JSON"):
        load_costs(KEY)
    save_costs(costs())                                  # an unreadable cache is rewritten
    assert load_costs(KEY) == costs()
    data = json.loads(path.read_text())
    data["entries"][key_id(KEY)]["pair_ms"] = -1.0
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="field pair_ms"):
        load_costs(KEY)
    data["entries"][key_id(KEY)]["pair_ms"] = 0.004
    del data["entries"][key_id(KEY)]["full_step_ms"]
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=r"fields \['full_step_ms'\] are missing"):
        load_costs(KEY)
    # an entry of an older cost model (a coefficient it did not have) is measured again, not an error
    data["entries"][key_id(KEY)]["full_step_ms"] = 9.0
    del data["entries"][key_id(KEY)]["router_block_ms"]
    path.write_text(json.dumps(data))
    assert load_costs(KEY) is None
    path.write_text(json.dumps({"format": 99, "entries": {}}))
    with pytest.raises(CalibrationError, match="field format must be 1"):
        load_costs(KEY)


def test_step_model_adds_the_calibrated_terms():
    c = costs()
    full = c.full_step(depth=2, order=1)
    assert (full.attn, full.shared, full.pairs, full.reused) == (128, 128, 256, 0)
    assert c.step_ms_of(full) == pytest.approx(2.0 + 128 * 0.01 + 128 * 0.005 + 256 * 0.004 + 512 * 0.0003
                                               + 2 * 0.05)
    token_full = c.full_step(depth=2, order=1, level="token")     # histories keep attention + MoE per token
    assert token_full.pushed == 256
    assert c.step_ms_of(token_full) == pytest.approx(c.step_ms_of(full) - 256 * 0.0003)
    fc = c.forecast_step(depth=2, order=1, new_pairs_per_token=0.5)
    assert fc.new_pairs == 32 and fc.pairs == 0 and fc.reused == 4 * 64 * 2 - 32 and fc.routed_blocks == 2
    assert c.new_pair_ms == c.pair_ms                         # set by hand without it: new pairs at pair_ms
    assert c.step_ms_of(fc) == pytest.approx(2.0 + 32 * 0.004 + 480 * 0.0002 + 32 * 0.0003 + 2 * 0.05)
    slow = costs(new_pair_ms=0.02)                            # a few rows per expert: dearer than full compute's pairs
    assert slow.step_ms_of(fc) == pytest.approx(c.step_ms_of(fc) + 32 * (0.02 - 0.004))
    assert slow.step_ms_of(full) == pytest.approx(c.step_ms_of(full))       # a refresh's pairs stay at pair_ms
    token = c.forecast_step(depth=2, order=1, new_pairs_per_token=0.5, level="token")   # no router, no pairs
    assert (token.pairs, token.routed_blocks, token.reused) == (0, 0, 2 * 64 * 2)
    assert c.step_ms_of(token) == pytest.approx(2.0 + 256 * 0.0002)
    plain = StepWork(attn=0, shared=0, pairs=32, reused=480, order=0, routed_blocks=2)
    assert c.step_ms_of(plain) == pytest.approx(2.0 + 32 * 0.004 + 2 * 0.05)
    taylor = StepWork(attn=0, shared=0, pairs=32, reused=480, order=2, routed_blocks=2)
    assert c.step_ms_of(taylor) == pytest.approx(2.0 + 32 * 0.004 + 2 * 480 * 0.0002 + 2 * 32 * 0.0003 + 2 * 0.05)
    assert c.predicted_speedup([full, fc, fc]) == pytest.approx(27.0 / (c.step_ms_of(full) + 2 * c.step_ms_of(fc)))


NOISY = float("inf")
"""max_fit_error of tests about caching, on a shared machine whose timings are anything but quiet."""


def test_measured_calibration_is_cached_and_redone_when_the_engine_changes(cache_dir, monkeypatch):
    model = make_tiny()                       # this test is about caching: any fit error is accepted (NOISY)
    torch.set_num_threads(1)
    measured = []
    real = cal.measure_costs
    monkeypatch.setattr(cal, "measure_costs", lambda *a, **k: measured.append(1) or real(*a, **k))
    first = cal.ensure_costs(model, SAMPLER, 2, steps=4, repeats=1, progress=None, max_fit_error=NOISY)
    assert len(measured) == 1 and first.key == cal.calibration_key(model, SAMPLER, 2)
    assert all(getattr(first, c) >= 0 for c in COEFFICIENTS) and first.full_step_ms > 0
    assert first.rows_per_block == 2 * 16 * 2 and first.top_k == 2
    assert first.refresh_over_full > 0                    # its own full steps over its full-compute reference
    assert cal.ensure_costs(model, SAMPLER, 2, steps=4, repeats=1, progress=None, max_fit_error=NOISY) == first
    assert len(measured) == 1                                               # cached
    monkeypatch.setattr(cal, "engine_hash", lambda: "a-changed-engine")
    again = cal.ensure_costs(model, SAMPLER, 2, steps=4, repeats=1, progress=None, max_fit_error=NOISY)
    assert len(measured) == 2 and again.key["engine"] == "a-changed-engine"  # stale: measured again
    assert cal.ensure_costs(model, SAMPLER, 4, steps=4, repeats=1, progress=None,
                            max_fit_error=NOISY).key["batch"] == "4"
    assert len(measured) == 3                                               # another batch, another key


def test_refresh_bookkeeping_is_timed_directly_not_fitted(monkeypatch):
    """history_term_ms and stack_term_ms come from their direct timing (a refresh step's noise would
    swamp them in the fit); the other coefficients are fitted around them."""
    seen, real = [], cal.bookkeeping_ms

    def fake(rows, width, device):
        seen.append((rows, width))
        return 0.0005, 0.00025

    monkeypatch.setattr(cal, "bookkeeping_ms", fake)
    costs = cal.measure_costs(make_tiny(), SAMPLER, 2, steps=4, repeats=1)
    assert seen == [(2 * 16 * 2, TINY.hidden_size)]
    assert (costs.history_term_ms, costs.stack_term_ms) == (0.0005, 0.00025)
    push, stack = real(64, 32, torch.device("cpu"), repeats=3)
    assert 0 < push < 1 and 0 < stack < 1                      # ms per row


def test_calibration_schedules_separate_every_coefficient():
    """The fit is identifiable: the features of the calibration steps have full column rank."""
    import numpy as np

    model = make_tiny()
    short = replace(SAMPLER, num_steps=6)
    rows = []
    for schedule in cal.calibration_schedules(model.config, short):
        rt = cal.ReplayRuntime(schedule)
        with model.use_runtime(rt), torch.inference_mode():
            from moeca.diffusion.samplers import sample
            sample(model, short, torch.tensor([0, 1]), seed=0)
        works = cal.step_work(rt.counters, schedule)
        rows += [w.features() for w in works[1:]]
        branch_forecast = [s for s in range(1, short.num_steps) if not schedule.is_sync(s)
                           and schedule.rule(s, 0).moe.mode in ("always", "routing")
                           and all(e.mode == "reuse" for e in schedule.rule(s, 0).experts)]
        # a branch-level or routing-aware forecast step's computed pairs are its new pairs, never pair_ms's
        assert all(works[s].pairs == 0 and works[s].new_pairs == rt.counters.expert[s].sum() for s in branch_forecast)
    assert np.linalg.matrix_rank(np.asarray(rows)) == len(COEFFICIENTS)


def test_replay_prints_predicted_against_measured():
    model = make_tiny()
    key = cal.calibration_key(model, SAMPLER, 2)
    from moeca.policy.schedule import full_schedule
    plain = full_schedule(model.config, SAMPLER)
    assert cal.prediction_line(plain, 1.2, model, SAMPLER, 2) is None
    s = plain.with_provenance(predicted_speedup=2.0, calibration={**key, "created": "x"})
    assert cal.prediction_line(s, 1.9, model, SAMPLER, 2) == "wall-clock speedup: predicted 2.00x, measured 1.90x (-5.0%)"
    other = cal.prediction_line(s, 1.9, model, SAMPLER, 4)
    assert "another setting (batch '2' -> '4')" in other


def test_cli_calibrate_on_the_demo_model(cache_dir, capsys):
    from moeca.cli.main import main
    from moeca.models.registry import demo_weights_path

    if not demo_weights_path().is_file():
        pytest.skip("demo weights not shipped")
    assert main(["calibrate", "--model", "demo", "--batch", "1", "--steps", "4", "--repeats", "1", "--threads", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "calibrating: round 1 of 2" in out and "full step" in out and "pair_ms" in out
    entries = json.loads((cache_dir / "calibration.json").read_text())["entries"]
    assert len(entries) == 1 and next(iter(entries.values()))["key"]["batch"] == "1"
    assert main(["calibrate", "--batch", "0"]) == 2


@pytest.mark.slow
def test_main_job_reports_a_wallclock_target_out_of_reach(tmp_path, capsys, cache_dir):
    """`moeca run` calibrates once, derives for wall-clock targets, and lists one it cannot meet instead of
    replaying it."""
    from moeca.cli.main import main
    from moeca.models.registry import demo_weights_path

    if not demo_weights_path().is_file():
        pytest.skip("demo weights not shipped")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--steps", "6", "--trace-samples", "2", "--quality-samples", "0",
                 "--timing-samples", "1", "--repeats", "1", "--target-speedups", "50", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| 50x | out of reach |" in printed and "predicted wall-clock speedup is at most" in printed
    assert not (out / "schedule-50x.json").exists() and (cache_dir / "calibration.json").is_file()


def test_derive_measures_through_the_replay_calibration_without_a_global_slot():
    """policy/ never imports replay/ and keeps no provider slot: ``moeca schedule derive --target-speedup``
    (moeca.cli.schedule, the composition root) calls the replay stage's measurement directly."""
    import moeca.cli.schedule as schedule_cli
    import moeca.policy.wallclock as wallclock

    assert not hasattr(wallclock, "costs_provider") and not hasattr(wallclock, "set_costs_provider")
    source = Path(schedule_cli.__file__).read_text()
    assert "from moeca.replay.calibrate import ensure_costs" in source
    model = make_tiny()
    got = cal.ensure_costs(model, SAMPLER, 2, steps=4, repeats=1, progress=None, max_fit_error=NOISY)
    assert got.key == cal.calibration_key(model, SAMPLER, 2) and load_costs(got.key) == got