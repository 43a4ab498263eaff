"""Forecast order (``forecast: taylor``, ``forecast_order``): the interpolating polynomial in float32,
``linear`` == ``taylor`` order 1 bit for bit, and higher orders in a real replay."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY, make_tiny
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.policy.schedule import ALWAYS, REUSE, BlockRule, ModelIdentity, SamplerIdentity, Schedule, StepRule
from moeca.replay.forecast import History
from moeca.replay.runtime import ReplayRuntime

STEPS = 10
SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=STEPS, cfg_scale=1.5)
LABELS = torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_history_is_exact_for_polynomials_of_its_degree_on_unequal_steps(degree):
    torch.manual_seed(degree)
    coef = torch.randn(degree + 1, 5, 3, dtype=torch.float64)

    def poly(s: float) -> torch.Tensor:
        return sum(coef[j] * s ** j for j in range(degree + 1))

    h = History.empty(degree, 5, 3, torch.device("cpu"))
    for s in (0, 1, 3, 4, 7, 8):               # unequal spacing; older values drop out of the history
        h.push_all(poly(s), s)
    assert h.vals.dtype == torch.float32 and h.forecast(9).dtype == torch.float32
    torch.testing.assert_close(h.forecast(11).double(), poly(11), rtol=2e-4, atol=2e-4)
    # rows computed fewer times use the order their history allows: a row pushed once is reused plainly
    fresh = torch.tensor([2])
    h.forget(torch.tensor([False, False, True, False, False]))
    h.push_rows(fresh, torch.ones(1, 3), 9)
    assert torch.equal(h.forecast(12)[2], torch.ones(3))
    # a masked push changes exactly the masked rows
    before = h.forecast(12).clone()
    mask = torch.tensor([True, False, False, False, True])
    h.push_where(mask, torch.full((5, 3), float("nan")).index_fill_(0, torch.tensor([0, 4]), 2.0), 12)
    after = h.forecast(12)
    assert torch.equal(after[~mask], before[~mask]) and torch.equal(after[mask], torch.full((2, 3), 2.0))


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_gate_weighted_combine_equals_the_weighted_sum_of_forecasts(degree):
    """``History.combine`` (the routed pairs' forecast folded into their gates) is the gate-weighted sum of
    the per-slot forecasts, with a tensor step (what compiled code passes) or a number."""
    torch.manual_seed(degree)
    N, k, D = 6, 2, 4
    h = History.empty(degree, N * k, D, torch.device("cpu"))
    for s in (0, 2, 3):
        h.push_all(torch.randn(N * k, D), s)
    h.push_rows(torch.tensor([1, 4]), torch.randn(2, D), 5)       # some slots computed later than others
    w = torch.rand(N, k)
    expected = (h.forecast(7).view(N, k, D) * w.unsqueeze(-1)).sum(dim=1)
    torch.testing.assert_close(h.combine(7, w), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.combine(torch.tensor(7.0), w), expected, rtol=1e-5, atol=1e-6)
    assert h.combine(7, w.to(torch.bfloat16)).dtype == torch.float32


def test_taylor_matches_taylorseer_finite_differences_on_equal_spacing():
    """Equal spacing ``h``: the forecast equals the finite-difference Taylor expansion
    ``sum_j Delta^j y / (j! h^j) * prod_{i<j} (s - s_0 + i h)`` (TaylorSeer's)."""
    ys = torch.randn(4, 2, 3)                      # values at steps 0, 2, 4, 6 (oldest first)
    h = History.empty(3, 2, 3, torch.device("cpu"))
    for i, y in enumerate(ys):
        h.push_all(y, 2 * i)
    diffs, level = [ys[-1]], ys
    for _ in range(3):
        level = level[1:] - level[:-1]
        diffs.append(level[-1])
    s, want, prod = 9.0, torch.zeros(2, 3), 1.0
    for j, d in enumerate(diffs):
        want = want + d / (torch.lgamma(torch.tensor(j + 1.0)).exp() * 2 ** j) * prod
        prod *= (s - 6 + 2 * j)
    torch.testing.assert_close(h.forecast(int(s)), want, rtol=1e-4, atol=1e-4)


def _schedule(forecast: str, order: int = 1) -> Schedule:
    body = BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * TINY.num_experts)
    steps = tuple(StepRule("compute", (body,) * TINY.depth) for _ in range(STEPS))
    return Schedule("moeca", ModelIdentity.of(TINY), SamplerIdentity.of(SAMPLER), steps, (0, 1, 2, 3, 6, 9),
                    forecast=forecast, forecast_order=order)


def _replay(model, schedule):
    rt = ReplayRuntime(schedule)
    with model.use_runtime(rt):
        return sample(model, SAMPLER, LABELS, seed=3), rt


def test_linear_is_taylor_order_1_bit_for_bit_and_higher_orders_replay(tiny_model):
    ref = sample(tiny_model, SAMPLER, LABELS, seed=3)
    linear, rt_lin = _replay(tiny_model, _schedule("linear"))
    order1, _ = _replay(tiny_model, _schedule("taylor", 1))
    assert torch.equal(linear, order1)
    plain, _ = _replay(tiny_model, _schedule("none"))
    err = {"none": float((plain - ref).norm() / ref.norm()), "linear": float((linear - ref).norm() / ref.norm())}
    for order in (2, 3):
        out, rt = _replay(tiny_model, _schedule("taylor", order))
        assert not torch.equal(out, linear)
        err[f"taylor{order}"] = float((out - ref).norm() / ref.norm())
        # the same rows ran; only the forecast work grows with the order
        t, tl = rt.counters.totals(), rt_lin.counters.totals()
        assert {k: t[k] for k in ("expert", "attn_q", "shared")} == {k: tl[k] for k in ("expert", "attn_q", "shared")}
        assert t["forecast"] == order * tl["forecast"]
    assert all(0 < e < 0.2 for e in err.values()), err


def test_forecast_state_is_float32_for_a_bfloat16_model():
    model = make_tiny().to(torch.bfloat16)
    dtypes = []

    def inspect(step):
        if step == 5:   # a forecast step: every unit's history is in use
            block = rt._contexts["batched"].blocks[0]
            dtypes.extend(u.hist.vals.dtype for u in (block.attn, block.shared, block.experts))

    rt = ReplayRuntime(_schedule("taylor", 2))
    with model.use_runtime(rt):
        out = sample(model, SAMPLER, LABELS, seed=3, on_step=inspect)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert dtypes == [torch.float32] * 3
    assert rt.counters.totals()["expert"] < rt.counters.totals()["pairs"]


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_pushes_of_all_rows_skip_the_row_mask_with_the_same_values(degree):
    """While every push covers all rows, the history knows on the host how many computations each row
    keeps and skips the per-row mask; the values equal the masked form's bit for bit (steps 0..5 cover the
    counts 1..degree+1), and a partial push falls back to the masked form."""
    torch.manual_seed(degree)
    fast = History.empty(degree, 6, 4, torch.device("cpu"))
    masked = History.empty(degree, 6, 4, torch.device("cpu"))
    for s in (0, 2, 3, 5, 8, 9):
        y = torch.randn(6, 4)
        masked.host_ts = None                  # force the masked form
        fast.push_all(y, s)
        masked.push_all(y, s)
        for a, b in ((fast.vals, masked.vals), (fast.ts, masked.ts), (fast.cnt, masked.cnt)):
            assert torch.equal(a, b)
        assert fast.slots == masked.slots
        torch.testing.assert_close(fast.forecast(s + 2), masked.forecast(s + 2), rtol=1e-6, atol=1e-6)
    assert fast.uniform == degree + 1
    fast.push_rows(torch.tensor([1]), torch.ones(1, 4), 10)
    assert fast.uniform is None


def _forecast_all_schedule(order: int) -> Schedule:
    """Steps 0, 1, 4, 7 computed; every other step reuses attention and the whole MoE output of every block."""
    from moeca.policy.methods.common import assemble, block_rule, full_blocks
    from dataclasses import replace as dc_replace
    sync = (0, 1, 4, 7)
    reuse = tuple(block_rule(TINY.num_experts, attn=REUSE, moe=REUSE) for _ in range(TINY.depth))
    steps = [StepRule("compute", full_blocks(TINY.depth, TINY.num_experts) if s in sync else reuse) for s in range(STEPS)]
    schedule = assemble("taylorseer", TINY, SAMPLER, steps, sync=sync)
    return dc_replace(schedule, forecast="taylor", forecast_order=order)


@pytest.mark.parametrize("order", [1, 2])
def test_a_step_forecasting_every_block_runs_as_one_sum_over_the_stack(tiny_model, monkeypatch, order):
    """On a step whose every block reuses attention and the whole MoE output, the runtime adds the stack's
    gated forecasts to the residual at once: no block module runs (no norm, attention, router or expert), the
    result equals the block-by-block path up to summation order, and the counters are the same (the exact
    sum; the folded one is tested in test_stack_fold.py)."""
    from moeca.replay import runtime as replay_runtime
    schedule = _forecast_all_schedule(order)
    calls = {"norm2": 0}
    for block in tiny_model.blocks:
        block.norm2.register_forward_hook(lambda *a: calls.__setitem__("norm2", calls["norm2"] + 1))
    stacked = ReplayRuntime(schedule, fold=False)
    with tiny_model.use_runtime(stacked):
        fast = sample(tiny_model, SAMPLER, LABELS, seed=5)
    assert calls["norm2"] == 4 * TINY.depth      # the four computed steps (batched CFG: one forward per step)
    monkeypatch.setattr(replay_runtime, "stack_ready", lambda *a: False)
    blockwise = ReplayRuntime(schedule, fold=False)
    with tiny_model.use_runtime(blockwise):
        slow = sample(tiny_model, SAMPLER, LABELS, seed=5)
    assert calls["norm2"] == 4 * TINY.depth + STEPS * TINY.depth
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, sample(tiny_model, SAMPLER, LABELS, seed=5))   # it did reuse
    for name in stacked.counters.FIELDS:
        assert np.array_equal(getattr(stacked.counters, name), getattr(blockwise.counters, name)), name
    assert stacked.counters.totals() == blockwise.counters.totals()


@pytest.mark.parametrize("degree", [1, 2])
def test_an_eager_push_of_all_rows_writes_one_buffer_and_compiled_code_shifts_to_the_same_values(degree, monkeypatch):
    """Eager: a push of all rows turns the ring of buffers and writes only the newest one (one copy).
    Compiled code (``is_compiling``) keeps the ring fixed and shifts the buffers; the forecasts agree."""
    torch.manual_seed(degree)
    ring = History.empty(degree, 5, 3, torch.device("cpu"))
    pushes = [(s, torch.randn(5, 3)) for s in (0, 1, 3, 4)]
    for s, y in pushes:
        before = [(ring.level(j).data_ptr(), ring.level(j).clone()) for j in range(degree + 1)]
        ring.push_all(y, s)
        assert torch.equal(ring.level(0), y) and ring.level(0).data_ptr() == before[-1][0]
        for j in range(1, degree + 1):      # older values were not moved: the same buffers, unchanged
            assert ring.level(j).data_ptr() == before[j - 1][0] and torch.equal(ring.level(j), before[j - 1][1])
    with pytest.raises(ValueError, match="increasing steps"):
        ring.push_all(pushes[0][1], 4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    shifted = History.empty(degree, 5, 3, torch.device("cpu"))
    for s, y in pushes:
        shifted.push_all(y, s)
    assert shifted.slots == list(range(degree + 1)) and shifted.uniform is None
    for j in range(degree + 1):
        assert torch.equal(shifted.level(j), ring.level(j))
    monkeypatch.undo()
    torch.testing.assert_close(shifted.forecast(6), ring.forecast(6))
