"""TaylorSeer (issues 12, 26): full compute every N steps after the first ones, Taylor forecasts in between.

Mechanics on tiny random models: order 1 is the linear forecast bit for bit; order 2 is TaylorSeer's
finite-difference expansion, pinned against the published formula evaluated by hand, and differs from
the interpolating polynomial (``forecast: polynomial``), which is exact on a quadratic trajectory.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.policy.methods import Context, taylorseer
from moeca.policy.methods.common import predicted_flops_ratio
from moeca.replay.runtime import ReplayRuntime
from moeca.policy.cost import UnitCosts
from moeca.policy.schedule import MAX_FORECAST_ORDER, Schedule

from conftest import TINY, make_tiny

STEPS = 12
SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=STEPS, cfg_scale=2.0, cfg_mode="batched")
LABELS = torch.tensor([0, 1, 2])
ROWS = 2 * len(LABELS) * TINY.num_tokens


def replay(model, schedule):
    runtime = ReplayRuntime(schedule)
    with model.use_runtime(runtime):
        out = sample(model, SAMPLER, LABELS, seed=3)
    return out, runtime.counters


def test_refresh_steps_follow_the_published_cadence():
    # first_enhance = 2 steps in full, then one full step every N (N - 1 forecasts in between)
    assert taylorseer.refresh_steps(taylorseer.Config(interval=4), STEPS) == [0, 1, 5, 9]
    assert taylorseer.refresh_steps(taylorseer.Config(interval=3, first_steps=1), STEPS) == [0, 3, 6, 9]
    assert taylorseer.refresh_steps(taylorseer.Config(interval=1), STEPS) == list(range(STEPS))


def test_schedule_forecasts_every_block_between_refresh_steps():
    model = make_tiny()
    cfg = taylorseer.Config(interval=4, order=2)
    schedule = taylorseer.build(cfg, Context(TINY, SAMPLER, "w"))
    assert (schedule.method, schedule.forecast, schedule.forecast_order) == ("taylorseer", "taylor", 2)
    assert schedule.sync_refresh_steps == (0, 1, 5, 9) and schedule.model.weights_hash == "w"
    _, c = replay(model, schedule)
    refresh = np.isin(np.arange(STEPS), schedule.sync_refresh_steps)
    for name, per_row in (("attn_q", 1), ("shared", 1), ("router", 1), ("expert", TINY.top_k)):
        counts = getattr(c, name)
        assert (counts[refresh] == ROWS * per_row).all() and (counts[~refresh] == 0).all(), name
    costs = UnitCosts.of(TINY)
    done, full = c.flops(costs)
    t = c.totals()
    terms = t["forecast"] + t["stack"]       # the Taylor terms evaluated on forecast steps count as FLOPs
    assert t["forecast"] > 0 and t["stack"] > 0      # exact sums in the first interval, folded ones after
    assert predicted_flops_ratio(schedule, TINY) == pytest.approx((done - terms * costs.forecast_term) / full, rel=1e-6)


def test_interval_one_is_full_compute_and_round_trips(tmp_path):
    model = make_tiny()
    schedule = taylorseer.build(taylorseer.Config(interval=1, order=3), Context(TINY, SAMPLER))
    out, _ = replay(model, schedule)
    assert torch.equal(out, sample(model, SAMPLER, LABELS, seed=3))
    path = schedule.save(tmp_path / "ts.json")
    again = Schedule.load(path)
    assert again.to_json() == json.loads(path.read_text()) and again.forecast_order == 3


def test_order_one_is_the_linear_forecast_bit_for_bit():
    model = make_tiny()
    ts = taylorseer.build(taylorseer.Config(interval=3, order=1), Context(TINY, SAMPLER))
    linear = replace(ts, forecast="linear", forecast_order=1)
    plain = replace(ts, forecast="none")
    a, _ = replay(model, ts)
    b, _ = replay(model, linear)
    c, _ = replay(model, plain)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)          # the forecast does something


class _QuadraticAttention(torch.nn.Module):
    """Attention stand-in whose output is a quadratic in the sampling step: ``A + B s + C s^2`` per token."""

    def __init__(self, clock: dict, tokens: int, width: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.clock = clock
        self.coef = torch.randn(3, tokens, width, generator=g) * torch.tensor([0.3, 0.05, 0.004]).view(3, 1, 1)

    def forward(self, x_mod: torch.Tensor) -> torch.Tensor:
        s = float(self.clock["step"])
        out = self.coef[0] + self.coef[1] * s + self.coef[2] * s * s
        return out.expand(x_mod.shape[0], -1, -1).contiguous()


class _Recording(ReplayRuntime):
    """Replay that records the attention output it uses (computed, or reused whole and forecast by the
    engine's block fast path) per (step, block)."""

    def __init__(self, schedule, clock: dict):
        super().__init__(schedule)
        self.clock, self.used = clock, {}

    def attention(self, block, x_mod):
        out = super().attention(block, x_mod)
        self.used[(self.clock["step"], block.index)] = out.detach().clone()
        return out


def _recording_reused_attention(original):
    def wrapper(rt, block, *args):
        out = original(rt, block, *args)
        if out is not None and isinstance(rt, _Recording):
            rt.used[(rt.clock["step"], block.index)] = out.detach().clone()
        return out
    return wrapper


def test_defaults_are_the_authors_dit_setting():
    assert taylorseer.Config() == taylorseer.Config(interval=4, order=4, first_steps=2)


def test_order_two_follows_the_published_finite_differences(monkeypatch):
    """Every block's attention output is a quadratic in the step (``A + B s + C s^2``, independent of the
    input); refreshes at 0, 1, 5, 9. After the third refresh (three computed values) the forecast at step
    ``s`` is TaylorSeer's ``d0 + d1 k + d2 k^2 / 2``, ``k = s - 5``, with ``d1(5) = (y5 - y1) / 4``, ``d1(1) =
    (y1 - y0) / 1``, ``d2(5) = (d1(5) - d1(1)) / 4`` computed here by hand from the true outputs; it is not
    exact, while ``forecast: polynomial`` of order 2 is exact and order 1 neither. With two computed values
    (steps 2..4) every kind is the linear forecast."""
    from moeca.replay import runtime as replay_runtime
    monkeypatch.setattr(replay_runtime, "reused_attention", _recording_reused_attention(replay_runtime.reused_attention))
    monkeypatch.setattr(replay_runtime, "stack_ready", lambda *a: False)   # block by block, to record each forecast
    model = make_tiny()
    clock = {"step": -1}
    for i, block in enumerate(model.blocks):
        block.attn = _QuadraticAttention(clock, TINY.num_tokens, TINY.hidden_size, seed=10 + i)
    model.register_forward_pre_hook(lambda *_: clock.__setitem__("step", clock["step"] + 1))

    def used(order, forecast="taylor"):
        schedule = taylorseer.build(taylorseer.Config(interval=4, order=order), Context(TINY, SAMPLER))
        rt = _Recording(replace(schedule, forecast=forecast), clock)
        clock["step"] = -1                      # one forward per step (batched CFG)
        with model.use_runtime(rt):
            sample(model, SAMPLER, LABELS, seed=3)
        return rt.used

    def truth(step, block):
        attn = model.blocks[block].attn
        clock["step"] = step
        return attn(torch.zeros(ROWS // TINY.num_tokens, TINY.num_tokens, TINY.hidden_size))

    one, two, poly = used(1), used(2), used(2, "polynomial")
    assert set(one) == set(two) == {(s, b) for s in range(STEPS) for b in range(TINY.depth)}
    for b in range(TINY.depth):
        y0, y1, y5 = truth(0, b), truth(1, b), truth(5, b)
        d1_5, d1_1 = (y5 - y1) / 4, (y1 - y0) / 1
        d2_5 = (d1_5 - d1_1) / 4
        for s in (6, 7, 8):
            k = s - 5
            torch.testing.assert_close(two[(s, b)], y5 + d1_5 * k + d2_5 * k * k / 2, rtol=1e-5, atol=1e-5)
            exact = truth(s, b)
            torch.testing.assert_close(poly[(s, b)], exact, rtol=1e-5, atol=1e-5)
            assert (two[(s, b)] - exact).abs().max() > 1e-4
            assert (one[(s, b)] - exact).abs().max() > 1e-3
        for s in (2, 3, 4):                      # two computed values: every kind is linear
            torch.testing.assert_close(two[(s, b)], one[(s, b)], rtol=0, atol=1e-6)
            torch.testing.assert_close(poly[(s, b)], one[(s, b)], rtol=0, atol=1e-6)
        for s in (0, 1, 5, 9):                   # refresh steps: computed
            torch.testing.assert_close(two[(s, b)], truth(s, b), rtol=0, atol=0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="interval"):
        taylorseer.Config(interval=0)
    with pytest.raises(ValueError, match="order"):
        taylorseer.Config(order=MAX_FORECAST_ORDER + 1)
    with pytest.raises(ValueError, match="first_steps"):
        taylorseer.Config(first_steps=0)
