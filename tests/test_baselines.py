"""Baselines (issue 6): no-reuse settings equal full compute; each reuses exactly what its rule says.

Rows actually executed are read from the replay runtime's counters ([steps, blocks] arrays).
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.policy.baselines import fora, l2c, none, teacache, toca
from moeca.policy.baselines.common import predicted_flops_ratio
from moeca.policy.schedule import Schedule
from moeca.replay.runtime import ReplayRuntime

from conftest import TINY, make_tiny

STEPS = 12
SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=STEPS, cfg_scale=2.0, cfg_mode="batched")
LABELS = torch.tensor([0, 1, 2])
ROWS = 2 * len(LABELS) * TINY.num_tokens  # batched CFG: [cond; uncond] rows per block and step
K = TINY.top_k


@pytest.fixture(scope="module")
def model():
    return make_tiny()


@pytest.fixture(scope="module")
def reference(model):
    return sample(model, SAMPLER, LABELS, seed=3)


def replay(model, schedule):
    runtime = ReplayRuntime(schedule)
    with model.use_runtime(runtime):
        out = sample(model, SAMPLER, LABELS, seed=3)
    return out, runtime.counters


@pytest.fixture(scope="module")
def router(model):
    return l2c.train_router(model, SAMPLER, l2c.L2CConfig(calibration_samples=2, batch_samples=1, max_iterations=12,
                                                           tolerance=0.0))


def no_reuse_schedules(router):
    return {
        "none": none.build_schedule(none.NoneConfig(), TINY, SAMPLER),
        "fora": fora.build_schedule(fora.ForaConfig(interval=1), TINY, SAMPLER),
        "toca": toca.build_schedule(toca.TocaConfig(fresh_threshold=1), TINY, SAMPLER),
        "teacache": teacache.build_schedule(teacache.TeaCacheConfig(rel_l1_thresh=0.0), TINY, SAMPLER),
        "l2c": l2c.build_schedule(router, l2c.L2CConfig(threshold=0.0), TINY, SAMPLER),
    }


@pytest.mark.parametrize("name", ["none", "fora", "toca", "teacache", "l2c"])
def test_no_reuse_setting_reproduces_full_compute_exactly(model, reference, router, name):
    schedule = no_reuse_schedules(router)[name]
    assert schedule.method == name
    out, counters = replay(model, schedule)
    assert torch.equal(out, reference)
    totals = counters.totals()
    assert totals["expert"] == totals["pairs"] == STEPS * TINY.depth * ROWS * K
    assert totals["attn_q"] == totals["shared"] == totals["tokens"] == STEPS * TINY.depth * ROWS
    assert totals["skipped_forwards"] == 0
    assert schedule.predicted_flops_ratio == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["none", "fora", "toca", "teacache", "l2c"])
def test_schedules_round_trip_through_the_published_schema(tmp_path, router, name):
    schedule = no_reuse_schedules(router)[name]
    path = schedule.save(tmp_path / f"{name}.json")
    again = Schedule.load(path)
    assert again.to_json() == json.loads(path.read_text())
    assert again.method == name


def test_fora_reuses_every_block_between_refresh_steps(model):
    schedule = fora.build_schedule(fora.ForaConfig(interval=3), TINY, SAMPLER)
    _, c = replay(model, schedule)
    refresh = np.array([s % 3 == 0 for s in range(STEPS)])
    for name, per_row in (("attn_q", 1), ("shared", 1), ("router", 1), ("expert", K)):
        counts = getattr(c, name)
        assert (counts[refresh] == ROWS * per_row).all(), name
        assert (counts[~refresh] == 0).all(), name
    assert fora.refresh_steps(fora.ForaConfig(interval=3), STEPS) == [0, 3, 6, 9]
    assert fora.refresh_steps(fora.ForaConfig(interval=3, compute_last_step=True), STEPS) == [0, 3, 6, 9, 11]
    assert fora.reuse_fraction(fora.ForaConfig(interval=3), STEPS) == pytest.approx(8 / 12)


def test_fora_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        fora.ForaConfig(interval=0)


def test_toca_recomputes_the_planned_token_count_per_sample(model, monkeypatch):
    cfg = toca.TocaConfig(fresh_threshold=4, fresh_ratio=0.2)
    schedule = toca.build_schedule(cfg, TINY, SAMPLER)
    sel = schedule.token_selection
    assert (sel.kind, sel.soft_fresh_weight, sel.fresh_threshold, sel.spatial_bonus, sel.spatial_grid) == (
        "toca", cfg.soft_fresh_weight, cfg.fresh_threshold, cfg.spatial_bonus, cfg.spatial_grid)
    runtime = ReplayRuntime(schedule)
    picked = []
    from moeca.replay.units import selection, token
    original = selection._toca

    def spy(cache, fraction, sel, batch, rows):
        got = original(cache, fraction, sel, batch, rows)
        if got.rows is not None:
            picked.append((got.rows // TINY.num_tokens).bincount(minlength=batch))
        return got

    monkeypatch.setattr(selection, "_toca", spy)
    monkeypatch.setattr(token, "select_rows", selection.select_rows)
    with model.use_runtime(runtime):
        sample(model, SAMPLER, LABELS, seed=3)
    assert picked, "the replay engine no longer applies ToCa's selection to the whole-MoE fraction rule"
    assert all(len(set(per_sample.tolist())) == 1 for per_sample in picked)  # the same count in every sample
    c = runtime.counters
    plan = toca.plan(cfg, STEPS, TINY.depth, TINY.num_tokens)
    assert plan[0].refresh and any(not p.refresh for p in plan)
    samples = ROWS // TINY.num_tokens
    for p in plan:
        for b in range(TINY.depth):
            if p.refresh:
                assert c.attn_q[p.step, b] == ROWS and c.expert[p.step, b] == ROWS * K
                continue
            fresh = p.moe_fresh_tokens[b] * samples  # int(ratio * T) tokens of every sample
            assert c.attn_q[p.step, b] == 0, "ToCa's published schedule reuses attention on cached steps"
            assert c.shared[p.step, b] == fresh and c.router[p.step, b] == fresh
            assert c.expert[p.step, b] == fresh * K


def test_toca_selection_is_per_sample_staleness_and_spatial_bonus():
    cfg = toca.TocaConfig(soft_fresh_weight=0.25, fresh_threshold=4, spatial_bonus=0.0)
    h = torch.zeros(2, 4, 3)
    h[..., 0] = 1.0
    stale = torch.tensor([[0, 0, 8, 0], [0, 0, 0, 0]])
    moved = h.clone()
    moved[1, 3] = torch.tensor([0.0, 1.0, 0.0])  # sample 1: token 3 changed direction
    score = toca.token_scores(cfg, moved, h, stale)
    assert toca.select_tokens(score, 1).tolist() == [[2], [3]]
    bonus = toca.spatial_bonus(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 0.5, 2)
    assert bonus.tolist() == [[1.0, 2.0, 3.0, 6.0]]  # the best of the 2x2 patch gets +50%


def test_toca_published_schedule_shape():
    cfg = toca.TocaConfig()
    assert (cfg.fresh_threshold, cfg.fresh_ratio, cfg.soft_fresh_weight) == (4, 0.07, 0.25)
    plan = toca.plan(cfg, 50, 6, 64)
    assert plan[0].refresh and plan[-1].refresh
    cached = [p for p in plan if not p.refresh]
    assert all(p.attention_fresh_tokens == (0,) * 6 for p in cached)
    # fresh ratios shrink with depth and grow towards the end of sampling
    assert all(list(p.moe_fresh_tokens) == sorted(p.moe_fresh_tokens, reverse=True) for p in cached)
    assert cached[-1].moe_fresh_tokens[0] > cached[0].moe_fresh_tokens[0]
    assert all(p.refresh for p in toca.plan(toca.TocaConfig(fresh_threshold=1), 50, 6, 64))


class _RecordingTeaCache(ReplayRuntime):
    """Records block 0's modulated input of every call, to re-derive the skip decisions independently."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.inputs: list[torch.Tensor] = []

    def run_blocks(self, model, x, c):
        self.inputs.append(model.blocks[0].attention_input(x, c).clone())
        return super().run_blocks(model, x, c)


@pytest.mark.parametrize("thresh", [0.02, 0.05])
def test_teacache_skips_exactly_the_calls_its_rule_says(model, thresh):
    fit = teacache.fit_rescale_polynomial(model, SAMPLER, LABELS, seeds=(5,), degree=2)
    assert len(fit.coefficients) == 3 and len(fit.input_changes) == STEPS - 1
    cfg = fit.config(thresh)
    schedule = teacache.build_schedule(cfg, TINY, SAMPLER)
    runtime = _RecordingTeaCache(schedule)
    with model.use_runtime(runtime):
        sample(model, SAMPLER, LABELS, seed=3)
    # the published rule on the recorded inputs
    expected, acc = [], 0.0
    for s, m in enumerate(runtime.inputs):
        if cfg.forced(s, STEPS):
            compute = True
        else:
            acc += float(np.polyval(cfg.coefficients, teacache.relative_l1(m, runtime.inputs[s - 1])))
            compute = acc >= thresh
        if compute:
            acc = 0.0
        expected.append(compute)
    assert not all(expected) and sum(expected) >= 2
    c = runtime.counters
    computed = c.expert.sum(axis=1) > 0
    assert computed.tolist() == expected
    assert (c.expert[computed] == ROWS * K).all() and (c.attn_q[computed] == ROWS).all()
    assert (c.attn_q[~computed] == 0).all() and (c.router[~computed] == 0).all()
    assert c.skipped_forwards == STEPS - sum(expected)


def test_l2c_reuses_exactly_the_exported_decisions(model, router):
    values = np.unique(router.beta[1:])
    assert values.size >= 2
    threshold = float(values[values.size // 2 - 1] + values[values.size // 2]) / 2   # splits the learned values
    cfg = l2c.L2CConfig(threshold=threshold)
    mask = router.reuse_mask(cfg)
    assert not mask[0].any()
    assert (mask[1:] == (router.beta[1:] < threshold)).all() and 0 < mask.sum() < mask[1:].size
    _, c = replay(model, l2c.build_schedule(router, cfg, TINY, SAMPLER))
    assert (c.attn_q == np.where(mask[:, :, 0], 0, ROWS)).all()
    assert (c.attn_kv == np.where(mask[:, :, 0], 0, ROWS)).all()
    assert (c.expert == np.where(mask[:, :, 1], 0, ROWS * K)).all()
    assert (c.shared == np.where(mask[:, :, 1], 0, ROWS)).all()


def test_l2c_sparsity_penalty_pushes_routers_towards_reuse(model):
    one = l2c.L2CConfig(calibration_samples=1, batch_samples=None, max_iterations=3)
    small = l2c.train_router(model, SAMPLER, replace(one, sparsity=0.0))
    large = l2c.train_router(model, SAMPLER, replace(one, sparsity=10.0))
    assert large.beta[1:].mean() < small.beta[1:].mean()
    assert (small.beta[0] == 1).all()


def test_l2c_trains_each_step_until_its_loss_converges_and_keeps_the_curves(model):
    cfg = l2c.L2CConfig(calibration_samples=2, batch_samples=1, max_iterations=400, tolerance=0.05, window=4)
    router = l2c.train_router(model, SAMPLER, cfg, weights_hash="abc")
    assert len(router.curves) == STEPS and router.curves[0] == ()
    lengths = [len(c) for c in router.curves[1:]]
    assert all(l2c.converged(c, cfg.tolerance, cfg.window) for c in router.curves[1:])
    assert all(2 * cfg.window <= n < cfg.max_iterations for n in lengths)   # stopped by convergence, not the cap
    for c in router.curves[1:]:                                            # not converged one window earlier
        assert not l2c.converged(c[:-1], cfg.tolerance, cfg.window) or len(c) == 2 * cfg.window
    assert router.meta["converged_steps"] == STEPS - 1 and router.meta["weights_hash"] == "abc"
    assert router.meta["iterations"]["total"] == sum(lengths)
    never = l2c.train_router(model, SAMPLER, l2c.L2CConfig(calibration_samples=1, batch_samples=None, max_iterations=5,
                                                           tolerance=0.0))
    assert all(len(c) == 5 for c in never.curves[1:])


def test_l2c_convergence_rule():
    assert l2c.converged([4, 4, 4, 4], 0.01, 2)
    assert not l2c.converged([8, 8, 4, 4], 0.01, 2)      # still falling by half a window to the next
    assert not l2c.converged([4, 4, 4], 0.01, 2)         # fewer than two windows
    assert not l2c.converged([4, 4, 4, 4], 0.0, 2)       # tolerance 0: run to the cap


def test_l2c_router_file_round_trip_and_shape_check(tmp_path, router):
    path = tmp_path / "router.json"
    router.save(path)
    again = l2c.L2CRouter.load(path)
    np.testing.assert_array_equal(again.beta, router.beta)
    assert again.curves == router.curves and again.meta == router.meta
    with pytest.raises(ValueError, match="retrain"):
        l2c.build_schedule(again, l2c.L2CConfig(), TINY, SamplerConfig(num_steps=STEPS + 1, cfg_scale=2.0))


def test_predicted_flops_ratio_matches_counted_rows(model):
    schedule = fora.build_schedule(fora.ForaConfig(interval=4), TINY, SAMPLER)
    _, c = replay(model, schedule)
    from moeca.policy.cost import UnitCosts
    costs = UnitCosts.of(TINY)
    done, full = c.flops(costs)
    t = c.totals()
    assert t["stack"] > 0                              # FORA's reuse steps ran as the folded stack sum
    # the prediction counts compute only: the forecast work (2 D FLOPs per row) is the rest
    forecast = (t["forecast"] + t["stack"]) * costs.forecast_term
    assert predicted_flops_ratio(schedule, TINY) == pytest.approx((done - forecast) / full, rel=1e-6)


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="fresh_ratio"):
        toca.TocaConfig(fresh_ratio=1.5)
    with pytest.raises(ValueError, match="rel_l1_thresh"):
        teacache.TeaCacheConfig(rel_l1_thresh=-1)
    with pytest.raises(ValueError, match="threshold"):
        l2c.L2CConfig(threshold=2.0)
    with pytest.raises(ValueError, match="batch_samples"):
        l2c.L2CConfig(calibration_samples=4, batch_samples=8)


def test_teacache_fit_measures_the_predicted_channels_only():
    """A learn_sigma model: weights of the variance channels do not move the fit; the predicted ones do."""
    import dataclasses
    cfg = dataclasses.replace(TINY, learn_sigma=True)
    C_out = cfg.out_channels
    variance = torch.tensor([i % C_out >= cfg.in_channels for i in range(cfg.patch_size ** 2 * C_out)])

    def fit_with(rows, scale):
        m = make_tiny(cfg)
        with torch.no_grad():
            m.final_layer.linear.weight[rows] *= scale
            m.final_layer.linear.bias[rows] += scale
        return teacache.fit_rescale_polynomial(m, SAMPLER, LABELS, seeds=(5,), degree=2)

    base = fit_with(variance, 1.0)
    assert fit_with(variance, 7.0).output_changes == base.output_changes
    assert fit_with(~variance, 7.0).output_changes != base.output_changes
