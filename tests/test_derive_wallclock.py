"""MoECa derivation: drift-guided refresh placement and wall-clock targets (synthetic traces, hand-set costs)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeca.policy.cost import UnitCosts
from moeca.policy.derive import (DeriveConfig, derive_schedule, drift_sync_steps, drift_tables, even_sync_steps,
                                 step_drift, sync_work)
from moeca.policy.wallclock import WallClockCosts

from conftest import TINY, make_tiny
from test_schedule import SAMPLER, run_meta, synthetic_summary


def costs(step_ms: float = 4.0, **over) -> WallClockCosts:
    """Hand-set unit costs of TINY at batch 2 with CFG (N = 2 * 16 * 2 rows per block): a full step is
    ``step_ms + 64 * 2 * (attn + shared + 2 pair + 2 history)`` ms."""
    base = dict(step_ms=step_ms, attn_row_ms=0.01, shared_row_ms=0.01, pair_ms=0.01,
                forecast_term_ms=0.001, history_term_ms=0.001, router_block_ms=0.0, full_step_ms=12.0, rows_per_block=64, top_k=2,
                key={"device": "test"}, stack_term_ms=0.0005)
    return WallClockCosts(**{**base, **over})


def intervals(sync, weight):
    """Accumulated weight of each interval between consecutive refresh steps (and after the last)."""
    edges = sorted(sync) + [len(weight)]
    return np.array([weight[a:b].sum() for a, b in zip(edges, edges[1:])])


# ----------------------------------------------------------------------------- placement
def test_drift_placement_puts_refreshes_where_the_drift_is():
    w = np.array([1.0] * 20 + [8.0] * 20)                        # drift 8x higher in the second half
    cfg = DeriveConfig()
    sync = drift_sync_steps(w, 10, cfg)
    assert len(sync) == 10 and 0 in sync
    late = sum(s >= 20 for s in sync)
    assert late >= 7                                            # even spacing would give 5
    assert sum(s >= 20 for s in even_sync_steps(40, 10, cfg)) == 5
    # the drift accumulated per interval is far more even than with evenly spaced refreshes
    spread = lambda s: intervals(s, w).max() / intervals(s, w).min()  # noqa: E731
    assert spread(sync) < spread(even_sync_steps(40, 10, cfg))


def test_uniform_drift_gives_even_spacing_and_collisions_stay_distinct():
    cfg = DeriveConfig(final_steps=1)
    assert drift_sync_steps(np.ones(50), 10, cfg) == even_sync_steps(50, 10, cfg)
    spike = np.zeros(12)
    spike[5] = 1.0                                               # all the drift on step 5
    sync = drift_sync_steps(spike, 4, DeriveConfig())
    assert len(sync) == 4 and 5 in sync and 0 in sync


def test_derived_schedule_places_refreshes_on_the_traced_drift():
    """The synthetic trace's drift falls over sampling: drift placement refreshes the early steps more."""
    summary, meta = synthetic_summary(num_steps=24), run_meta(sampler=SAMPLER.__class__(
        kind="rectified_flow", num_steps=24, cfg_scale=1.5, cfg_mode="batched"))
    drift = derive_schedule(summary, meta, DeriveConfig(target_speedup=2.5, placement="drift"))
    even = derive_schedule(summary, meta, DeriveConfig(target_speedup=2.5, placement="even"))
    d = step_drift(drift_tables(summary, 24, TINY.depth, TINY.num_experts), UnitCosts.of(TINY))
    first_half = lambda s: sum(x < 12 for x in s.sync_refresh_steps)  # noqa: E731
    assert first_half(drift) > first_half(even)
    assert intervals(drift.sync_refresh_steps, d).max() < intervals(even.sync_refresh_steps, d).max()
    assert drift.predicted_flops_ratio <= 1 / 2.5 and drift.provenance["config"]["placement"] == "drift"


# ----------------------------------------------------------------------------- wall-clock targets
def test_wallclock_target_uses_the_calibrated_costs():
    summary, meta = synthetic_summary(), run_meta()
    wc = costs()
    s = derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8, target="wallclock"), wc)
    tables = drift_tables(summary, SAMPLER.num_steps, TINY.depth, TINY.num_experts)
    work = sync_work(tables, frozenset(s.sync_refresh_steps), wc, order=1, level=s.provenance["forecast_level"])
    # the recorded prediction is the cost model evaluated on the plan, coefficient by coefficient; the
    # histories keep every computed row at the branch level, attention + MoE output per token at the token level
    token = s.provenance["forecast_level"] == "token"
    by_hand = SAMPLER.num_steps * wc.full_step_ms / sum(
        wc.step_ms + wc.attn_row_ms * w.attn + wc.shared_row_ms * w.shared + wc.pair_ms * w.pairs
        + wc.forecast_term_ms * w.reused
        + wc.history_term_ms * (2 * w.attn if token else w.attn + w.shared + w.pairs + w.new_pairs)
        + wc.router_block_ms * w.routed_blocks + wc.stack_term_ms * w.stack_terms + wc.new_pair_ms * w.new_pairs
        for w in work)
    assert s.provenance["predicted_speedup"] == pytest.approx(by_hand, rel=1e-3)
    assert s.provenance["predicted_speedup"] >= 1.8
    assert s.provenance["calibration"]["device"] == "test"
    # the most refreshes that reach the target: one more would miss it
    more = DeriveConfig(target_speedup=1.8, target="wallclock")
    assert derive_schedule(summary, meta, more, costs(step_ms=3.0)).sync_refresh_steps != s.sync_refresh_steps


def test_wallclock_and_flops_targets_differ_when_bookkeeping_costs():
    """A forecast step that costs a third of a full step (fixed bookkeeping) needs fewer refreshes for the
    same wall-clock target than for the same FLOPs target."""
    summary, meta = synthetic_summary(), run_meta()
    flops = derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8))
    wall = derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8, target="wallclock"), costs())
    assert len(wall.sync_refresh_steps) < len(flops.sync_refresh_steps)
    assert wall.predicted_flops_ratio < flops.predicted_flops_ratio
    with pytest.raises(ValueError, match="predicted wall-clock speedup is at most"):
        derive_schedule(summary, meta, DeriveConfig(target_speedup=3.5, target="wallclock"), costs())
    with pytest.raises(ValueError, match="needs the calibrated unit costs"):
        derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8, target="wallclock"))
    with pytest.raises(ValueError, match="refresh='sync'"):
        DeriveConfig(target_speedup=1.8, target="wallclock", refresh="budget")
    with pytest.raises(ValueError, match="top_k"):
        derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8, target="wallclock"), costs(top_k=1))


def test_forecast_level_follows_the_price_of_routing():
    """Token-level forecast steps skip the router and the newly routed pairs. ``auto`` takes them when a
    wall-clock target then fits more refreshes (routing is dear on this device), keeps the branch level when
    routing is free, and with a FLOPs target; a fixed level is honoured and recorded."""
    from moeca.policy.schedule import REUSE

    summary, meta = synthetic_summary(), run_meta()
    dear = costs(router_block_ms=0.5)
    auto = derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8, target="wallclock"), dear)
    branch = derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8, target="wallclock",
                                                         forecast_level="branch"), dear)
    assert auto.provenance["forecast_level"] == "token" and branch.provenance["forecast_level"] == "branch"
    assert len(auto.sync_refresh_steps) > len(branch.sync_refresh_steps)
    # why: both levels priced, the refreshes each fits and its predicted forecast step recorded
    levels = auto.provenance["levels"]
    assert set(levels) == {"branch", "routing", "token"}
    assert levels["token"]["refreshes"] == len(auto.sync_refresh_steps) > levels["branch"]["refreshes"]
    assert levels["branch"]["refreshes"] == len(branch.sync_refresh_steps)
    assert levels["branch"]["forecast_step_ms"] > levels["token"]["forecast_step_ms"] > 0
    # routing-aware steps route and compute the new pairs too: dearer than token-level steps
    assert levels["routing"]["forecast_step_ms"] > levels["token"]["forecast_step_ms"]
    assert min(c["predicted_speedup"] for c in levels.values()) >= 1.8
    assert set(branch.provenance["levels"]) == {"branch"}
    forecast_steps = [s for s in range(SAMPLER.num_steps) if not auto.is_sync(s)]
    assert all(auto.rule(s, b).moe == REUSE for s in forecast_steps for b in range(TINY.depth))
    assert all(branch.rule(s, b).moe.mode == "always" for s in forecast_steps for b in range(TINY.depth))
    free = costs(pair_ms=0.0, history_term_ms=0.0)          # routing and new pairs cost nothing: no gain
    assert derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8, target="wallclock"),
                           free).provenance["forecast_level"] == "branch"
    assert derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8)).provenance["forecast_level"] == "branch"
    token = derive_schedule(summary, meta, DeriveConfig(target_speedup=1.8, forecast_level="token"))
    assert token.provenance["forecast_level"] == "token" and token.predicted_flops_ratio < 1 / 1.8
    with pytest.raises(ValueError, match="forecast_level"):
        DeriveConfig(forecast_level="expert")


def test_auto_takes_the_routing_level_where_it_fits_the_most_refreshes():
    """Where the calibration prices a per-row forecast dear and routing cheap (and the folded token step dearer
    still), the routing-aware level fits the most refreshes, and ``auto`` takes it and writes its ``routing``
    rules; the branch level (which forecasts every branch) and the token level fit fewer."""
    summary, meta = synthetic_summary(), run_meta()
    priced = costs(step_ms=0.5, forecast_term_ms=0.005, stack_term_ms=0.05, full_step_ms=6.2)
    auto = derive_schedule(summary, meta, DeriveConfig(target_speedup=1.3, target="wallclock"), priced)
    levels = auto.provenance["levels"]
    assert auto.provenance["forecast_level"] == "routing"
    assert levels["routing"]["refreshes"] == len(auto.sync_refresh_steps)
    assert levels["routing"]["refreshes"] > max(levels["token"]["refreshes"], levels["branch"]["refreshes"])
    forecast_steps = [s for s in range(SAMPLER.num_steps) if not auto.is_sync(s)]
    assert forecast_steps and all(auto.rule(s, b).moe.mode == "routing" for s in forecast_steps
                                  for b in range(TINY.depth))


def test_predicted_work_of_a_routing_level_plan_is_what_the_replay_counts():
    """A routing-aware refresh keeps attention, shared, pair and whole-MoE rows; its forecast steps compute the
    newly routed pairs and forecast attention and the whole MoE output of every token: the replay's counters
    (``moeca.replay.calibrate.step_work``) against the prediction (``sync_work``) step by step; the moved tokens'
    branch rows, which the prediction estimates from the trace, bound from above."""
    from moeca.diffusion.samplers import sample
    from moeca.replay.calibrate import step_work
    from moeca.replay.runtime import ReplayRuntime
    from moeca.policy.derive import drift_tables

    summary, meta = synthetic_summary(), run_meta()
    s = derive_schedule(summary, meta, DeriveConfig(target_speedup=2.0, forecast_level="routing"))
    model = make_tiny()
    rt = ReplayRuntime(s)
    labels = torch.tensor([0, 1])
    with torch.inference_mode(), model.use_runtime(rt):
        sample(model, SAMPLER, labels, seed=0)
    measured = step_work(rt.counters, s)
    tables = drift_tables(summary, SAMPLER.num_steps, TINY.depth, TINY.num_experts, True)
    predicted = sync_work(tables, frozenset(s.sync_refresh_steps), costs(), order=1, level="routing")
    n = 2 * len(labels) * TINY.num_tokens * TINY.depth
    for step, (m, p) in enumerate(zip(measured, predicted)):
        assert m.routed_blocks == p.routed_blocks == TINY.depth
        if s.is_sync(step):
            assert m.features()[5] == p.features()[5] == (3 + TINY.top_k) * n    # pushed rows (order 1)
        else:
            assert m.attn == m.shared == p.attn == p.shared == 0
            assert 2 * n <= m.reused <= 2 * n + (1 + TINY.top_k) * n
            assert 2 * n <= p.reused <= 2 * n + (1 + TINY.top_k) * n


def test_predicted_work_of_a_token_level_plan_is_what_the_replay_counts():
    """The wall-clock prediction's step work (``sync_work``) of a token-level plan -- per-unit forecasts
    until the second refresh, the folded stack after it, the fold's products rebuilt at every refresh --
    is, step by step, what the replay engine counts (``moeca.replay.calibrate.step_work``): its refreshes push
    attention and the whole MoE output of each token into the forecast histories, not every computed row."""
    from moeca.diffusion.samplers import sample
    from moeca.replay.calibrate import step_work
    from moeca.replay.runtime import ReplayRuntime

    summary, meta = synthetic_summary(), run_meta()
    s = derive_schedule(summary, meta, DeriveConfig(target_speedup=2.5, forecast_level="token"))
    labels = torch.tensor([0, 1])
    rt = ReplayRuntime(s)
    model = make_tiny()
    with model.use_runtime(rt):
        sample(model, SAMPLER, labels, seed=2)
    tables = drift_tables(summary, SAMPLER.num_steps, TINY.depth, TINY.num_experts)
    sync = frozenset(s.sync_refresh_steps)
    predicted = sync_work(tables, sync, costs(), order=1, level="token")
    counted = step_work(rt.counters, s)
    assert len(sync) >= 3 and any(w.stack_terms and not w.attn for w in counted)      # some steps were folded
    for step, (p, c) in enumerate(zip(predicted, counted)):
        assert (p.attn, p.shared, p.pairs, p.reused, p.routed_blocks, p.stack_terms) == \
            (c.attn, c.shared, c.pairs, c.reused, c.routed_blocks, c.stack_terms), step
        assert p.features() == c.features(), step        # the history pushes too (attention + MoE per token)
    refresh = predicted[min(sync)]
    assert refresh.pushed == 2 * refresh.attn < refresh.attn + refresh.shared + refresh.pairs



def test_refresh_pushes_of_a_branch_level_plan_are_what_the_replay_counts():
    """A branch-level refresh keeps every computed row (attention, shared and pair rows) in a history: the
    prediction and the counters agree on its work, history pushes included."""
    from moeca.diffusion.samplers import sample
    from moeca.replay.calibrate import step_work
    from moeca.replay.runtime import ReplayRuntime

    summary, meta = synthetic_summary(), run_meta()
    s = derive_schedule(summary, meta, DeriveConfig(target_speedup=2.0, forecast_level="branch"))
    rt = ReplayRuntime(s)
    model = make_tiny()
    with model.use_runtime(rt):
        sample(model, SAMPLER, torch.tensor([0, 1]), seed=2)
    tables = drift_tables(summary, SAMPLER.num_steps, TINY.depth, TINY.num_experts)
    predicted = sync_work(tables, frozenset(s.sync_refresh_steps), costs(), order=1, level="branch")
    counted = step_work(rt.counters, s)
    for step in s.sync_refresh_steps:
        p, c = predicted[step], counted[step]
        assert p.features() == c.features(), step
        assert c.pushed == c.attn + c.shared + c.pairs > 0, step

def test_token_level_schedule_skips_the_router_when_replayed():
    """A token-level schedule really skips routing on its forecast steps and stays close to full compute."""
    from moeca.diffusion.samplers import sample
    from moeca.replay.runtime import ReplayRuntime

    summary, meta = synthetic_summary(), run_meta()
    s = derive_schedule(summary, meta, DeriveConfig(target_speedup=1.5, forecast_level="token"))
    model = make_tiny()
    labels = torch.tensor([0, 1])
    ref = sample(model, SAMPLER, labels, seed=2)
    rt = ReplayRuntime(s)
    with model.use_runtime(rt):
        out = sample(model, SAMPLER, labels, seed=2)
    t = rt.counters.totals()
    refreshed = len(s.sync_refresh_steps) * TINY.depth * 2 * 16 * 2       # rows routed on refresh steps only
    assert t["router"] == refreshed and t["expert"] == TINY.top_k * refreshed
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.2


def test_cli_derive_wallclock_and_flops_targets(tmp_path, capsys, monkeypatch):
    from moeca.cli.main import main
    import moeca.cli.schedule as pcli

    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "run.json").write_text("{}")
    monkeypatch.setattr(pcli, "load_summary", lambda traces, allow_mixed=False: (synthetic_summary(), run_meta()))
    asked = []
    monkeypatch.setattr(pcli, "replay_costs", lambda meta, args: asked.append(args.batch) or costs())
    out = tmp_path / "s.json"
    assert main(["schedule", "derive", str(trace), "--target-flops-speedup", "1.8", "--out", str(out)]) == 0
    assert not asked and "predicted wall-clock" not in capsys.readouterr().out
    flops = json.loads(out.read_text())
    assert flops["predicted_flops_ratio"] <= 1 / 1.8 and "predicted_speedup" not in flops["provenance"]
    assert main(["schedule", "derive", str(trace), "--target-speedup", "1.8", "--batch", "2", "--out", str(out),
                 "--overwrite"]) == 0
    assert asked == [2]
    printed = capsys.readouterr().out
    assert "predicted wall-clock speedup: 1.8" in printed or "predicted wall-clock speedup: 1.9" in printed
    wall = json.loads(out.read_text())
    assert wall["provenance"]["config"]["target"] == "wallclock" and wall["provenance"]["predicted_speedup"] >= 1.8
    with pytest.raises(SystemExit):                              # argparse: the targets exclude each other
        main(["schedule", "derive", str(trace), "--target-speedup", "2", "--target-flops-speedup", "2",
              "--out", str(out), "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["schedule", "derive", str(trace), "--batch", "0", "--out", str(out), "--overwrite"]) == 2
    assert "--batch 0 must be >= 1" in capsys.readouterr().err


def test_a_step_that_moves_far_refreshes_itself_and_the_count_is_exact():
    """The threshold rule: a spike of drift triggers a refresh at that very step; every count is reached."""
    w = np.full(30, 0.1)
    w[17] = 5.0
    cfg = DeriveConfig()
    for n in range(1, 31):
        sync = drift_sync_steps(w, n, cfg)
        assert len(sync) == n and 0 in sync
        if n >= 2:
            assert 17 in sync
    zero = np.zeros(12)
    zero[5] = 1.0
    sync = drift_sync_steps(zero, 4, cfg)          # no weight elsewhere: the longest intervals are split
    assert sorted(sync) == [0, 2, 5, 8]


def test_model_share_weights_the_last_ddpm_steps():
    from moeca.diffusion.samplers import SamplerConfig, model_share
    flow = model_share(SamplerConfig(kind="rectified_flow", num_steps=50))
    ddim = model_share(SamplerConfig(kind="ddim", num_steps=50))
    ddpm = model_share(SamplerConfig(kind="ddpm", num_steps=50))
    assert np.array_equal(flow, np.ones(50)) and np.allclose(ddim, 1.0)
    assert ddpm.shape == (50,) and np.all((ddpm > 0) & (ddpm <= 1)) and ddpm[-1] == 1.0
    assert ddpm[:40].max() < 0.7 < ddpm[-3]           # fresh noise dominates early; the last steps keep errors
    eta1 = model_share(SamplerConfig(kind="ddim", num_steps=50, eta=1.0))
    assert np.allclose(eta1, ddpm)                    # DDIM with eta 1 adds DDPM's noise


def test_ddpm_placement_puts_more_refreshes_late_than_the_same_drift_under_euler():
    summary = synthetic_summary(num_steps=24)
    flow = run_meta(sampler=SAMPLER.__class__(kind="rectified_flow", num_steps=24, cfg_scale=1.5, cfg_mode="batched"))
    ddpm = run_meta(sampler=SAMPLER.__class__(kind="ddpm", num_steps=24, cfg_scale=1.5, cfg_mode="batched"))
    cfg = DeriveConfig(target_speedup=2.5)
    a, b = (derive_schedule(summary, m, cfg).sync_refresh_steps for m in (flow, ddpm))
    assert len(a) == len(b) and sum(s >= 18 for s in b) > sum(s >= 18 for s in a)
