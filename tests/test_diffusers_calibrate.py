"""Wall-clock targets on HiDream (issue 25): the HiDream engine's calibration, its cost-model features, and
``moeca schedule derive --target-speedup`` on a HiDream trace (tiny random configs, CPU).

Needs the optional extra (``pip install -e ".[test,diffusers]"``); skipped without it.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from moeca.cli.main import main as moeca_main  # noqa: E402
from moeca.integrations.diffusers import apply_schedule  # noqa: E402
from moeca.integrations.diffusers import calibrate as hcal  # noqa: E402
from moeca.integrations.diffusers.sampling import (CONFIGS, TEXT_LENGTHS, FlowSampler, build_transformer,  # noqa: E402
                                                   initial_noise, random_conditioning)
from moeca.policy.derive import DeriveConfig, derive_schedule, drift_tables, sync_work  # noqa: E402
from moeca.policy.schedule import Schedule  # noqa: E402
from moeca.policy.wallclock import COEFFICIENTS, WallClockCosts, save_costs  # noqa: E402

NOISY = 10.0           # tests about mechanics accept any fit error (a shared machine's timings)
NAME = "tiny-4e"
HEIGHT = 128           # latents 16 x 16: 64 image tokens; text 8 T5 + 2 x 8 Llama


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    out = tmp_path_factory.mktemp("hidream") / "trace"
    torch.set_num_threads(1)
    assert moeca_main(["trace", "--diffusers-config", NAME, "--steps", "8", "--samples", "1", "--height", str(HEIGHT),
                       "--out", str(out), "--no-progress"]) == 0
    return out


def _setting() -> hcal.Setting:
    return hcal.Setting(batch=1, latent_size=(HEIGHT // 8, HEIGHT // 8), text_lengths=TEXT_LENGTHS[NAME])


def _summary(trace):
    from moeca.cli.schedule import load_summary
    return load_summary([str(trace)], False)


def test_trace_records_what_a_calibration_rebuilds(trace):
    meta = json.loads((trace / "run.json").read_text())
    assert meta["model"]["model_seed"] == 0
    assert meta["model"]["layout"]["latent_size"] == [16, 16]
    assert meta["model"]["layout"]["text_lengths"] == list(TEXT_LENGTHS[NAME])
    assert hcal.setting_of_trace(meta, 3) == hcal.Setting(3, (16, 16), TEXT_LENGTHS[NAME], 5.0)
    model = hcal.transformer_of_trace(meta)
    assert hcal.weights_hash(model) == meta["model"]["weights_hash"]


def test_calibration_schedules_separate_every_coefficient():
    """The fit is identifiable on HiDream too: the features the engine counts over the ten calibration
    schedules have full column rank."""
    model = build_transformer(NAME)
    s = _setting()
    cond, uncond = random_conditioning(CONFIGS[NAME], 1, seed=0, lengths=s.text_lengths)
    noise = initial_noise((model.config.in_channels, *s.latent_size), [0])
    rows = []
    for schedule in hcal.calibration_schedules(model, 6, 64 + cond.tokens):
        _, works = hcal.timed_steps(model, schedule, FlowSampler(num_steps=6), noise, cond, uncond)
        assert len(works) == 6
        rows += [w.features() for w in works[1:]]
    assert np.linalg.matrix_rank(np.asarray(rows)) == len(COEFFICIENTS)


@pytest.mark.parametrize("level", ["token", "branch"])
def test_predicted_work_is_what_the_hidream_engine_counts(trace, level):
    """The wall-clock prediction's step work (``sync_work``) of a derived plan is, step by step, what the
    HiDream engine counts: full refreshes, folded and unfolded stack steps (token level; the prediction
    prices the fold, so the replay folds whatever these random gates do), routed forecast steps (branch
    level: the traced share of new pairs against the replay's, so only their totals differ)."""
    summary, meta = _summary(trace)
    s = derive_schedule(summary, meta, DeriveConfig(target_speedup=2.0, forecast_level=level))
    model = build_transformer(NAME)
    setting = hcal.setting_of_trace(meta, 1)
    cond, uncond = random_conditioning(CONFIGS[NAME], 1, seed=0, lengths=setting.text_lengths)
    noise = initial_noise((model.config.in_channels, *setting.latent_size), [0])
    _, counted = hcal.timed_steps(model, s, FlowSampler(num_steps=s.num_steps), noise, cond, uncond,
                                  fold_tolerance=math.inf)
    rows = hcal._rows(model, setting)
    depth = s.model.depth
    assert rows % depth == 0                       # 2 x (2 x 64) + 2 x (2 x 88) rows over 4 blocks
    costs = WallClockCosts(*(1.0,) * 7, full_step_ms=1.0, rows_per_block=rows // depth, top_k=2)
    tables = drift_tables(summary, s.num_steps, depth, s.model.num_experts)
    predicted = sync_work(tables, frozenset(s.sync_refresh_steps), costs, order=1, level=level)
    assert len(s.sync_refresh_steps) >= 3
    for step, (p, c) in enumerate(zip(predicted, counted)):
        if level == "token" or step in s.sync_refresh_steps:
            assert p.features() == c.features(), step
        else:                                      # the new pairs are the trace's mean, not this run's
            assert (p.attn, p.shared, p.routed_blocks, p.stack_terms) == (c.attn, c.shared, c.routed_blocks,
                                                                          c.stack_terms), step
            assert p.new_pairs + p.reused == c.new_pairs + c.reused, step
            assert p.pairs == c.pairs == 0 and c.new_pairs > 0, step     # a forecast step computes new pairs only
    if level == "token":
        assert any(c.stack_terms and not c.attn for c in counted)            # folded stack steps ran


def test_measured_calibration_is_cached_per_key(cache_dir, monkeypatch):
    torch.set_num_threads(1)
    model = build_transformer(NAME)
    measured, real = [], hcal.measure_costs
    monkeypatch.setattr(hcal, "measure_costs", lambda *a, **k: measured.append(1) or real(*a, **k))
    first = hcal.ensure_costs(model, _setting(), steps=4, repeats=1, progress=None, max_fit_error=NOISY)
    assert len(measured) == 1 and first.key == hcal.calibration_key(model, _setting())
    assert first.key["model"].startswith("diffusers.HiDreamImageTransformer2DModel@")
    assert all(getattr(first, c) >= 0 for c in COEFFICIENTS) and first.full_step_ms > 0
    assert first.rows_per_block == hcal._rows(model, _setting()) // 4 and first.top_k == 2
    assert first.token_folds is False          # random gates: the engine's check keeps the exact gates
    assert hcal.ensure_costs(model, _setting(), steps=4, repeats=1, progress=None, max_fit_error=NOISY) == first
    assert len(measured) == 1                                               # cached
    monkeypatch.setattr(hcal, "engine_hash", lambda: "a-changed-engine")
    hcal.ensure_costs(model, _setting(), steps=4, repeats=1, progress=None, max_fit_error=NOISY)
    assert len(measured) == 2                                               # the engine changed: measured again


def _costs(model, setting, router_block_ms: float, stack_term_ms: float, token_folds: bool = True) -> WallClockCosts:
    """A calibration of this key with chosen prices (a perfect fit)."""
    return WallClockCosts(step_ms=1.0, attn_row_ms=0.01, shared_row_ms=0.005, pair_ms=0.005, forecast_term_ms=0.0005,
                          history_term_ms=0.0002, router_block_ms=router_block_ms, full_step_ms=20.0,
                          rows_per_block=hcal._rows(model, setting) // 4, top_k=2,
                          key=hcal.calibration_key(model, setting), stack_term_ms=stack_term_ms,
                          token_folds=token_folds)


@pytest.mark.parametrize("router, stack, level", [(3.0, 0.0001, "token"), (0.0, 0.05, "branch")])
def test_cli_wallclock_target_on_a_hidream_trace_chooses_the_level_by_cost(trace, cache_dir, capsys, router, stack,
                                                                            level):
    """``moeca schedule derive --target-speedup`` on a HiDream trace prices both levels with the HiDream
    engine's calibration of this transformer (batch 1 by default) and takes the one that fits more refreshes:
    token when routing is dear, branch when the stack's bookkeeping is."""
    torch.set_num_threads(1)
    meta = json.loads((trace / "run.json").read_text())
    model = hcal.transformer_of_trace(meta)
    save_costs(_costs(model, hcal.setting_of_trace(meta, 1), router, stack))
    out = trace.parent / f"s-{level}.json"
    assert moeca_main(["schedule", "derive", str(trace), "--target-speedup", "1.5", "--threads", "1",
                       "--out", str(out), "--overwrite"]) == 0
    s = Schedule.load(out)
    assert s.provenance["forecast_level"] == level
    assert s.provenance["calibration"]["model"] == meta["model"]["name"]
    assert s.provenance["calibration"]["batch"] == "1" and s.provenance["predicted_speedup"] >= 1.5
    assert "predicted wall-clock speedup" in capsys.readouterr().out
    handle = apply_schedule(model, s)                    # the schedule runs on the traced transformer
    handle.remove()


def test_a_trace_whose_weights_cannot_be_rebuilt_is_refused(trace, tmp_path):
    meta = json.loads((trace / "run.json").read_text())
    meta["model"]["model_seed"] = 7
    with pytest.raises(ValueError, match="weights"):
        hcal.transformer_of_trace(meta)


def test_cli_calibrate_measures_the_hidream_engine(trace, cache_dir, capsys):
    """``moeca calibrate --diffusers-config NAME`` measures the HiDream engine's costs under the key a
    wall-clock derive on a trace of the same transformer and shapes looks up."""
    assert moeca_main(["calibrate", "--diffusers-config", NAME, "--height", str(HEIGHT), "--steps", "4", "--repeats",
                       "1", "--threads", "1", "--max-fit-error", str(NOISY)]) == 0
    out = capsys.readouterr().out
    assert "stock step" in out and "router_block_ms" in out
    meta = json.loads((trace / "run.json").read_text())
    entries = json.loads((cache_dir / "calibration.json").read_text())["entries"]
    key = hcal.calibration_key(hcal.transformer_of_trace(meta), hcal.setting_of_trace(meta, 1))
    assert [e["key"] for e in entries.values()] == [key]
    assert moeca_main(["calibrate", "--diffusers-config", NAME, "--model", "demo"]) == 2     # one model, not two


def test_a_wallclock_derive_prices_the_stack_steps_as_the_engine_will_run_them(trace, cache_dir, capsys):
    """When the HiDream calibration's token-level runs did not fold (the gates moved far from linearly), a
    wall-clock derivation prices the token-level forecast steps unfolded (``fold`` False in its config)."""
    torch.set_num_threads(1)
    meta = json.loads((trace / "run.json").read_text())
    model = hcal.transformer_of_trace(meta)
    setting = hcal.setting_of_trace(meta, 1)
    schedules = {}
    for folds in (True, False):
        save_costs(_costs(model, setting, 3.0, 0.0001, token_folds=folds))
        out = trace.parent / f"s-folds-{folds}.json"
        assert moeca_main(["schedule", "derive", str(trace), "--target-speedup", "1.5", "--threads", "1",
                           "--out", str(out), "--overwrite"]) == 0
        schedules[folds] = Schedule.load(out)
    assert schedules[True].provenance["config"]["fold"] is True
    assert schedules[False].provenance["config"]["fold"] is False
    assert schedules[False].provenance["forecast_level"] == "token"
