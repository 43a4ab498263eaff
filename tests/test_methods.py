"""Caching methods (issues 6, 26): no-reuse settings equal full compute; each reuses exactly what its rule
says; each method's placement or forecast is pinned against numbers computed by hand from its published
formula (TaylorSeer's forecast: tests/test_taylorseer.py and test_taylor_weights_*).

Rows actually executed are read from the replay runtime's counters ([steps, blocks] arrays).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.policy.methods import REGISTRY, Context, fbcache, fora, l2c, magcache, none, teacache, toca
from moeca.policy.methods.common import predicted_flops_ratio
from moeca.policy.schedule import FORMAT_VERSION, Schedule
from moeca.replay.fit import l2c as l2c_fit
from moeca.replay.fit import teacache as teacache_fit
from moeca.replay.forecast import History, polynomial_weights, taylor_weights
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


CTX = Context(TINY, SAMPLER)


@pytest.fixture(scope="module")
def router(model):
    return l2c_fit.train_router(model, SAMPLER, l2c_fit.TrainConfig(calibration_samples=2, batch_samples=1,
                                                                     max_iterations=12, tolerance=0.0))


@pytest.fixture(scope="module")
def router_file(router, tmp_path_factory):
    path = tmp_path_factory.mktemp("l2c") / "router.json"
    router.save(path)
    return str(path)


def no_reuse_schedules(router_file):
    return {
        "none": none.build(none.Config(), CTX),
        "fora": fora.build(fora.Config(interval=1), CTX),
        "toca": toca.build(toca.Config(fresh_threshold=1), CTX),
        "teacache": teacache.build(teacache.Config(rel_l1_thresh=0.0), CTX),
        "l2c": l2c.build(l2c.Config(router=router_file, threshold=0.0), CTX),
        "fbcache": fbcache.build(fbcache.Config(threshold=0.0), CTX),
        "magcache": magcache.build(magcache.Config(mag_ratios=(1.0,) + (3.0,) * (STEPS - 1)), CTX),
    }


NO_REUSE = ["none", "fora", "toca", "teacache", "l2c", "fbcache", "magcache"]


@pytest.mark.parametrize("name", NO_REUSE)
def test_no_reuse_setting_reproduces_full_compute_exactly(model, reference, router_file, name):
    schedule = no_reuse_schedules(router_file)[name]
    assert schedule.method == name
    out, counters = replay(model, schedule)
    assert torch.equal(out, reference)
    totals = counters.totals()
    assert totals["expert"] == totals["pairs"] == STEPS * TINY.depth * ROWS * K
    assert totals["attn_q"] == totals["shared"] == totals["tokens"] == STEPS * TINY.depth * ROWS
    assert totals["skipped_forwards"] == 0
    assert schedule.predicted_flops_ratio == pytest.approx(1.0)


@pytest.mark.parametrize("name", NO_REUSE)
def test_schedules_round_trip_through_the_published_schema(tmp_path, router_file, name):
    schedule = no_reuse_schedules(router_file)[name]
    path = schedule.save(tmp_path / f"{name}.json")
    again = Schedule.load(path)
    assert again.to_json() == json.loads(path.read_text())
    assert again.method == name


def test_registry_lists_every_unit_with_documented_knobs():
    assert list(REGISTRY) == ["none", "moeca", "fora", "taylorseer", "toca", "teacache", "l2c", "fbcache", "magcache"]
    for m in REGISTRY.values():
        assert m.summary and m.Config.__dataclass_params__.frozen, m.name
        assert all(k.doc for k in m.knobs()), (m.name, [k.name for k in m.knobs() if not k.doc])
    with pytest.raises(ValueError, match="valid knobs: interval"):
        REGISTRY["fora"].config({"intervl": "3"})
    with pytest.raises(ValueError, match="knob interval takes an integer"):
        REGISTRY["fora"].config({"interval": "three"})
    with pytest.raises(ValueError, match="registered methods: none, moeca"):
        from moeca.policy.methods import method
        method("foo")
    assert REGISTRY["magcache"].config({"mag_ratios": "1,1.5"}).mag_ratios == (1.0, 1.5)
    assert REGISTRY["l2c"].config({"alternating": "false"}).alternating is False


def test_fora_phase_counts_down_from_the_last_step():
    # FORA: full where the countdown index i = S - 1 - s is a multiple of N, and at the first step
    assert fora.refresh_steps(fora.Config(interval=3), 12) == [0, 2, 5, 8, 11]
    full = fora.refresh_steps(fora.Config(interval=3), 50)
    assert len(full) == 18 and full[:3] == [0, 1, 4] and full[-1] == 49   # 17 from i = 48..0, plus the first
    assert fora.refresh_steps(fora.Config(interval=4), 50) == [0] + list(range(1, 50, 4))
    assert fora.Config() == fora.Config(interval=3)


def test_fora_reuses_every_block_between_refresh_steps(model):
    schedule = fora.build(fora.Config(interval=3), CTX)
    _, c = replay(model, schedule)
    refresh = np.isin(np.arange(STEPS), [0, 2, 5, 8, 11])
    for name, per_row in (("attn_q", 1), ("shared", 1), ("router", 1), ("expert", K)):
        counts = getattr(c, name)
        assert (counts[refresh] == ROWS * per_row).all(), name
        assert (counts[~refresh] == 0).all(), name
    assert schedule.sync_refresh_steps == (0, 2, 5, 8, 11)


def test_fora_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        fora.Config(interval=0)


def test_toca_recomputes_the_scheduled_token_count_per_sample(model, monkeypatch):
    cfg = toca.Config(fresh_threshold=3, fresh_ratio=0.2)
    schedule = toca.build(cfg, CTX)
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
    full = toca.refresh_steps(cfg, STEPS)
    samples, T = ROWS // TINY.num_tokens, TINY.num_tokens
    for s in range(STEPS):
        for b in range(TINY.depth):
            if s in full:
                assert c.attn_q[s, b] == ROWS and c.expert[s, b] == ROWS * K
                continue
            fresh = int(toca.fresh_ratio(cfg, s, STEPS, b, TINY.depth, "mlp") * T) * samples
            assert c.attn_q[s, b] == 0, "ToCa's published schedule reuses attention on cached steps"
            assert c.shared[s, b] == fresh and c.router[s, b] == fresh
            assert c.expert[s, b] == fresh * K


def test_toca_ddim50_recipe_by_hand():
    cfg = toca.Config()
    assert (cfg.fresh_threshold, cfg.fresh_ratio, cfg.ratio_scheduler, cfg.soft_fresh_weight) == (
        3, 0.07, "ToCa-ddim50", 0.25)
    # the interval is fixed at each full step: r = 49 -> round(3 / (1.4 - 0.8 * 49/50)) = round(4.87) = 5,
    # next full at r = 45 (s = 4): round(3 / 0.68) = 4 -> r = 44 (s = 5): round(3 / 0.696) = 4 -> r = 40 ...
    full = toca.refresh_steps(cfg, 50)
    assert full[:4] == [0, 4, 5, 9]
    assert toca.interval_at(cfg, 0, 50) == 5 and toca.interval_at(cfg, 4, 50) == 4
    assert toca.interval_at(cfg, 49, 50) == 2          # r = 0: round(3 / 1.4) = 2
    assert 49 in full                                  # r = 0 is a multiple of any interval
    # ratio scheduler ToCa-ddim50 (w_s = 2, w_l = -0.2), MLP factor 2.5, attention factor 0:
    # s = 39 (r = 10): step 3 - 4 * 10/50 = 2.2; block 0: layer 0.8 -> 0.07 * 0.8 * 2.2 * 2.5 = 0.308
    assert toca.fresh_ratio(cfg, 39, 50, 0, 28, "mlp") == pytest.approx(0.308)
    assert toca.fresh_ratio(cfg, 39, 50, 27, 28, "mlp") == pytest.approx(0.07 * 1.2 * 2.2 * 2.5)
    assert toca.fresh_ratio(cfg, 39, 50, 0, 28, "attn") == 0.0
    assert toca.fresh_ratio(cfg, 1, 50, 0, 28, "mlp") == 0.0     # r = 48: step factor -0.84 -> nothing
    ddpm = toca.Config(fresh_threshold=4, ratio_scheduler="ToCa-ddpm250")
    assert toca.interval_at(ddpm, 250 - 1 - 60, 250) == 2        # r = 60: the sensitive window


def test_toca_selection_is_the_published_similarity_score_with_staleness_and_spatial_bonus():
    from moeca.policy.schedule import TokenSelection
    from moeca.replay.state import RowCache
    from moeca.replay.units.selection import _toca, spatial_bonus
    sel = TokenSelection("toca", soft_fresh_weight=0.25, fresh_threshold=4, spatial_bonus=0.0)
    cached = torch.zeros(8, 3)
    cached[:, 0] = 1.0
    cache = RowCache(hist=History.empty(0, 8, 3, torch.device("cpu")), age=torch.tensor([0.0, 0, 8, 0, 0, 0, 0, 0]))
    cache.hist.push_all(cached, 0.0)
    x = cached.clone()
    x[7] = torch.tensor([0.0, 1.0, 0.0])       # sample 1, token 3: input orthogonal to its cached output
    x[5] = torch.tensor([1.0, 1.0, 0.0])       # sample 1, token 1: 45 degrees
    # sample 0: 1 - cos = 0 everywhere, token 2 stale for 8 steps: s3 = 0.25 * 8 / 4 = 0.5
    # sample 1: 1 - cos = (0, 0.29, 0, 1) -> L2-normalised (0, 0.28, 0, 0.96): token 3, then token 1
    assert _toca(cache, 0.25, sel, 2, x).rows.tolist() == [2, 7]
    assert sorted(_toca(cache, 0.5, sel, 2, x).rows.tolist()[2:]) == [5, 7]
    bonus = spatial_bonus(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 0.5, 2)
    assert bonus.tolist() == [[1.0, 2.0, 3.0, 6.0]]  # the best of the 2x2 patch gets +50%


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
    fit = teacache_fit.fit_rescale_polynomial(model, SAMPLER, LABELS, seeds=(5,), degree=2)
    assert len(fit.coefficients) == 3 and len(fit.input_changes) == STEPS - 1
    cfg = teacache.Config(rel_l1_thresh=thresh, coefficients=fit.coefficients)
    schedule = teacache.build(cfg, CTX)
    runtime = _RecordingTeaCache(schedule)
    with model.use_runtime(runtime):
        sample(model, SAMPLER, LABELS, seed=3)
    # the published rule on the recorded inputs
    expected, acc = [], 0.0
    for s, m in enumerate(runtime.inputs):
        if cfg.forced(s, STEPS):
            compute = True
        else:
            acc += float(np.polyval(cfg.coefficients, teacache_fit.relative_l1(m, runtime.inputs[s - 1])))
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


def test_l2c_reuses_exactly_the_exported_decisions(model, router, router_file):
    values = np.unique(router.beta[1::2])
    assert values.size >= 2
    threshold = float(values[values.size // 2 - 1] + values[values.size // 2]) / 2   # splits the learned values
    cfg = l2c.Config(router=router_file, threshold=threshold)
    mask = router.reuse_mask(cfg)
    odd = np.arange(STEPS) % 2 == 1
    assert not mask[~odd].any()                                    # alternating: only odd steps may reuse
    assert (mask[odd] == (router.beta[odd] < threshold)).all() and 0 < mask.sum() < mask[odd].size
    assert (router.beta[~odd] == 1).all()                          # only candidate steps are trained
    _, c = replay(model, l2c.build(cfg, CTX))
    assert (c.attn_q == np.where(mask[:, :, 0], 0, ROWS)).all()
    assert (c.attn_kv == np.where(mask[:, :, 0], 0, ROWS)).all()
    assert (c.expert == np.where(mask[:, :, 1], 0, ROWS * K)).all()
    assert (c.shared == np.where(mask[:, :, 1], 0, ROWS)).all()


def test_l2c_export_rule_by_hand(tmp_path):
    beta = np.ones((6, 2, 2))
    beta[1] = [[0.05, 0.5], [0.09, 0.2]]
    beta[2] = [[0.01, 0.01], [0.01, 0.01]]   # an even step: never reused (its cache would be a reused step)
    beta[3] = [[0.1, 0.099], [1.0, 0.0]]
    path = tmp_path / "r.json"
    l2c.L2CRouter(beta, np.zeros(6), {}, tuple(() for _ in range(6))).save(path)
    mask = l2c.L2CRouter.load(path).reuse_mask(l2c.Config(router=str(path)))   # threshold 0.1 (authors')
    expected = np.zeros((6, 2, 2), dtype=bool)
    expected[1] = [[True, False], [True, False]]
    expected[3] = [[False, True], [False, True]]
    assert (mask == expected).all()
    chained = l2c.L2CRouter.load(path).reuse_mask(l2c.Config(router=str(path), alternating=False))
    assert chained[2].all()
    assert l2c.candidate_steps(6) == [1, 3, 5] and l2c.Config().threshold == 0.1


def test_l2c_sparsity_penalty_pushes_routers_towards_reuse(model):
    one = l2c_fit.TrainConfig(calibration_samples=1, batch_samples=None, max_iterations=3)
    small = l2c_fit.train_router(model, SAMPLER, replace(one, sparsity=0.0))
    large = l2c_fit.train_router(model, SAMPLER, replace(one, sparsity=10.0))
    assert large.beta[1::2].mean() < small.beta[1::2].mean()
    assert (small.beta[0] == 1).all()


def test_l2c_trains_each_step_until_its_loss_converges_and_keeps_the_curves(model):
    cfg = l2c_fit.TrainConfig(calibration_samples=2, batch_samples=1, max_iterations=400, tolerance=0.05, window=4)
    router = l2c_fit.train_router(model, SAMPLER, cfg, weights_hash="abc")
    assert len(router.curves) == STEPS and all(router.curves[s] == () for s in range(0, STEPS, 2))
    trained = router.curves[1::2]                                          # the candidate (odd) steps
    lengths = [len(c) for c in trained]
    assert all(l2c_fit.converged(c, cfg.tolerance, cfg.window) for c in trained)
    assert all(2 * cfg.window <= n < cfg.max_iterations for n in lengths)   # stopped by convergence, not the cap
    for c in trained:                                                      # not converged one window earlier
        assert not l2c_fit.converged(c[:-1], cfg.tolerance, cfg.window) or len(c) == 2 * cfg.window
    assert router.meta["converged_steps"] == router.meta["trained_steps"] == STEPS // 2
    assert router.meta["weights_hash"] == "abc" and router.meta["iterations"]["total"] == sum(lengths)
    never = l2c_fit.train_router(model, SAMPLER, l2c_fit.TrainConfig(calibration_samples=1, batch_samples=None,
                                                                     max_iterations=5, tolerance=0.0))
    assert all(len(c) == 5 for c in never.curves[1::2])


def test_l2c_convergence_rule():
    assert l2c_fit.converged([4, 4, 4, 4], 0.01, 2)
    assert not l2c_fit.converged([8, 8, 4, 4], 0.01, 2)      # still falling by half a window to the next
    assert not l2c_fit.converged([4, 4, 4], 0.01, 2)         # fewer than two windows
    assert not l2c_fit.converged([4, 4, 4, 4], 0.0, 2)       # tolerance 0: run to the cap


def test_l2c_router_file_round_trip_and_shape_check(router, router_file):
    again = l2c.L2CRouter.load(router_file)
    np.testing.assert_array_equal(again.beta, router.beta)
    assert again.curves == router.curves and again.meta == router.meta
    with pytest.raises(ValueError, match="retrain"):
        l2c.build(l2c.Config(router=router_file), Context(TINY, SamplerConfig(num_steps=STEPS + 1, cfg_scale=2.0)))
    with pytest.raises(ValueError, match="router"):
        l2c.build(l2c.Config(), CTX)


def test_predicted_flops_ratio_matches_counted_rows(model):
    schedule = fora.build(fora.Config(interval=4), CTX)
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
        toca.Config(fresh_ratio=1.5)
    with pytest.raises(ValueError, match="rel_l1_thresh"):
        teacache.Config(rel_l1_thresh=-1)
    with pytest.raises(ValueError, match="threshold"):
        l2c.Config(threshold=2.0)
    with pytest.raises(ValueError, match="batch_samples"):
        l2c_fit.TrainConfig(calibration_samples=4, batch_samples=8)
    with pytest.raises(ValueError, match="max_skip_steps"):
        magcache.Config(max_skip_steps=-1)
    with pytest.raises(ValueError, match="first_blocks"):
        fbcache.Config(first_blocks=0)
    with pytest.raises(ValueError, match="below the model depth"):
        fbcache.build(fbcache.Config(first_blocks=TINY.depth), CTX)


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
        return teacache_fit.fit_rescale_polynomial(m, SAMPLER, LABELS, seeds=(5,), degree=2)

    base = fit_with(variance, 1.0)
    assert fit_with(variance, 7.0).output_changes == base.output_changes
    assert fit_with(~variance, 7.0).output_changes != base.output_changes


# ----------------------------------------------------------------------------- TaylorSeer's forecast weights
def test_taylor_weights_follow_the_published_finite_differences():
    # equal spacing N = 4, kept values at 8, 4, 0, forecast at 10 (k = 2): d1 = (y0 - y1) / 4,
    # d2 = (y0 - 2 y1 + y2) / 16, F = y0 + 2 d1 + 2 d2 -> weights (1.625, -0.75, 0.125)
    assert taylor_weights(10.0, [8.0, 4.0, 0.0]) == pytest.approx([1.625, -0.75, 0.125])
    # the interpolating polynomial differs by (k N / 2) d2 = 4 (1, -2, 1) / 16
    assert polynomial_weights(10.0, [8.0, 4.0, 0.0]) == pytest.approx([1.875, -1.25, 0.375])
    # unequal spacing 5, 1, 0 at 7: d1(5) = (y0 - y1) / 4, d1(1) = y1 - y2, d2 = (d1(5) - d1(1)) / 4
    assert taylor_weights(7.0, [5.0, 1.0, 0.0]) == pytest.approx([1.625, -1.125, 0.5])
    # order 1 is the linear forecast, for both kinds
    assert taylor_weights(6.0, [4.0, 0.0]) == pytest.approx([1.5, -0.5])
    assert polynomial_weights(6.0, [4.0, 0.0]) == pytest.approx([1.5, -0.5])
    # order 4 at equal spacing 1: sum_i Delta^i y / i! * k^i with backward differences; k = 1
    w = taylor_weights(5.0, [4.0, 3.0, 2.0, 1.0, 0.0])
    expected = np.zeros(5)
    for i, c in enumerate([1, 1, 1 / 2, 1 / 6, 1 / 24]):   # Delta^i y_0 = sum_j (-1)^j C(i, j) y_j
        for j in range(i + 1):
            expected[j] += c * (-1) ** j * math.comb(i, j)
    assert w == pytest.approx(expected.tolist())


def test_taylor_history_rows_match_the_host_weights():
    """Per-row weights (rows with different histories) equal the host arithmetic row by row."""
    g = torch.Generator().manual_seed(0)
    hist = History.empty(2, 3, 4, torch.device("cpu"), "taylor")
    vals = {t: torch.randn(3, 4, generator=g) for t in (0.0, 1.0, 5.0)}
    hist.push_rows(torch.tensor([0, 1, 2]), vals[0.0], 0.0)
    hist.push_rows(torch.tensor([0, 2]), vals[1.0][[0, 2]], 1.0)
    hist.push_rows(torch.tensor([0, 1]), vals[5.0][[0, 1]], 5.0)
    got = hist.forecast(7.0)
    kept = {0: [5.0, 1.0, 0.0], 1: [5.0, 0.0], 2: [1.0, 0.0]}
    for row, ts in kept.items():
        want = sum(w * vals[t][row] for w, t in zip(taylor_weights(7.0, ts), ts))
        torch.testing.assert_close(got[row], want)


# ----------------------------------------------------------------------------- MagCache and First-Block Cache
def test_magcache_skips_by_hand():
    ratios = (1.0, 1.0, 1.1, 0.9, 1.0, 1.0, 1.0, 0.8, 1.0, 1.0)
    cfg = magcache.Config(mag_ratios=ratios, threshold=0.15, max_skip_steps=2, retention_ratio=0.1)
    # retention round(0.1 * 10) = 1 step; s1: ratio 1, err 0 -> skip; s2: ratio 1.1, err 0.1 -> skip; s3: third
    # step in a row -> compute, reset; s4, s5 skip; s6 compute; s7: ratio 0.8, err 0.2 -> compute; s8, s9 skip
    assert magcache.skipped_steps(cfg, 10) == [1, 2, 4, 5, 8, 9]
    # indices round(i * 0.5) = 0, 0, 1, 2, 2 (half to even, as numpy.round in diffusers)
    assert magcache.nearest_interp((1.0, 2.0, 3.0), 5) == (1.0, 1.0, 2.0, 3.0, 3.0)
    d = magcache.Config()
    assert (d.threshold, d.max_skip_steps, d.retention_ratio) == (0.24, 5, 0.1)
    schedule = magcache.build(replace(cfg, mag_ratios=ratios + (1.0, 1.0)), CTX)   # 12 steps: s10 third in a row
    assert [s for s, st in enumerate(schedule.steps) if st.model == "reuse"] == [1, 2, 4, 5, 8, 9, 11]


def test_magcache_replay_adds_the_last_residual_and_fit_measures_ratios(model):
    from moeca.replay.fit.magcache import fit_mag_ratios
    ratios = fit_mag_ratios(model, SAMPLER, LABELS, seeds=(5,))
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    schedule = magcache.build(magcache.Config(mag_ratios=ratios, threshold=10.0, max_skip_steps=2), CTX)
    skipped = magcache.skipped_steps(magcache.Config(mag_ratios=ratios, threshold=10.0, max_skip_steps=2), STEPS)
    _, c = replay(model, schedule)
    assert c.skipped_forwards == len(skipped) > 0
    assert (c.expert[skipped] == 0).all() and (np.delete(c.expert, skipped, axis=0) == ROWS * K).all()


class _HeadRecorder(ReplayRuntime):
    """Records the first block's residual of every forward (to re-derive First-Block Cache's decisions)."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.heads: list[torch.Tensor] = []

    def run_blocks(self, model, x, c):
        original = model.blocks[0].forward

        def spy(h, cc, rt=None):
            out = original(h, cc, rt)
            self.heads.append((out - h).detach().clone())
            return out

        model.blocks[0].forward = spy
        try:
            return super().run_blocks(model, x, c)
        finally:
            del model.blocks[0].forward


def test_fbcache_skips_the_middle_blocks_exactly_as_its_rule_says(model):
    full = _HeadRecorder(fbcache.build(fbcache.Config(threshold=0.0), CTX))
    with model.use_runtime(full):
        sample(model, SAMPLER, LABELS, seed=3)
    diffs = [teacache_fit.relative_l1(b, a) for a, b in zip(full.heads, full.heads[1:])]
    thresh = float(np.median(diffs))
    rt = _HeadRecorder(fbcache.build(fbcache.Config(threshold=thresh), CTX))
    with model.use_runtime(rt):
        sample(model, SAMPLER, LABELS, seed=3)
    expected, prev = [True], rt.heads[0]
    for r in rt.heads[1:]:                  # diffusers: compute when the change exceeds the threshold
        compute = teacache_fit.relative_l1(r, prev) >= thresh
        expected.append(compute)
        if compute:
            prev = r
    assert 1 < sum(expected) < STEPS
    c = rt.counters
    assert (c.expert[:, 0] == ROWS * K).all()                               # the first block always runs
    assert ((c.expert[:, 1:] > 0).all(axis=1) == np.array(expected)).all()  # the rest as the rule says
    assert c.skipped_forwards == STEPS - sum(expected)


# ----------------------------------------------------------------------------- schedule format
def test_format_3_taylor_files_load_as_the_interpolating_polynomial(tmp_path):
    from moeca.policy.methods import taylorseer
    schedule = taylorseer.build(taylorseer.Config(order=2), CTX)
    data = schedule.to_json()
    assert (data["format_version"], data["forecast"]) == (FORMAT_VERSION, "taylor")
    old = {**data, "format_version": 3, "model_skip": None}
    assert Schedule.from_json(old).forecast == "polynomial"
    assert Schedule.from_json(data).forecast == "taylor"
