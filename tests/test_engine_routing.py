"""The routing-aware forecast step (``moe`` rule ``routing``, :func:`moeca.replay.units.branch.routing_forecast`):
a token whose routed experts are the set it had at the last refresh gets its whole MoE output forecast per token;
a token whose set changed gets its newly routed pairs computed and its branches forecast with the current gates,
plus the shared expert's forecast. Checked against an independent computation from the caches it read, on the
host and the device path; with a router that never moves it is the token level; the format refuses it where it
does not apply."""
from __future__ import annotations


import pytest
import torch

import moeca.replay.units.branch as branch
from conftest import TINY, make_tiny
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.policy.schedule import (ALWAYS, REUSE, ROUTING, BlockRule, ModelIdentity, Rule, SamplerIdentity, Schedule,
                                   ScheduleError, StepRule)
from moeca.replay.runtime import ReplayRuntime

STEPS = 9
SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=STEPS, cfg_scale=1.5)
LABELS = torch.tensor([0, 1, 2, 1, 0])
REFRESH = (0, 3, 6)
FORECAST_STEPS = [1, 2, 4, 5, 7, 8]


def level_schedule(moe: Rule) -> Schedule:
    """Refreshes at steps 0, 3 and 6; between them attention, shared expert and branches reused, the MoE rule
    ``moe`` (``routing``: routing-aware, ``always``: the branch level, ``reuse``: the token level)."""
    E = TINY.num_experts
    body = BlockRule(REUSE, moe, REUSE, (REUSE,) * E)
    steps = tuple(StepRule("compute", ((BlockRule.full(E) if s in REFRESH else body),) * TINY.depth)
                  for s in range(STEPS))
    return Schedule("moeca", ModelIdentity.of(TINY), SamplerIdentity.of(SAMPLER), steps, REFRESH, forecast="linear")


def replay(model, runtime: ReplayRuntime) -> torch.Tensor:
    with torch.inference_mode(), model.use_runtime(runtime):
        return sample(model, SAMPLER, LABELS, seed=5)


def linear(vals: torch.Tensor, ts: torch.Tensor, cnt: torch.Tensor, step: float) -> torch.Tensor:
    """The linear forecast of every row of a history copy (``vals [2, R, D]`` newest first, ``ts [2, R]``, ``cnt
    [R]``): the newest value where a row keeps one value, else the line through the two."""
    y0, y1 = vals[0], vals[1]
    w = ((step - ts[0]) / (ts[0] - ts[1]).clamp(min=1e-9)).unsqueeze(1)
    return torch.where((cnt > 1).unsqueeze(1), y0 + (y0 - y1) * w, y0)


def snapshot(hist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A history's values newest first, steps and counts, copied."""
    return (torch.stack([hist.level(j).clone() for j in range(hist.degree + 1)]), hist.ts.clone(), hist.cnt.clone())


@pytest.mark.parametrize("device_path", [False, True])
def test_routing_step_equals_an_independent_computation_from_its_caches(monkeypatch, device_path):
    model = make_tiny(seed=1)
    k, D = TINY.top_k, TINY.hidden_size
    real = branch.routing_forecast
    checked: list[tuple[int, int, int]] = []

    def spy(rt, block, st, flat, topk_idx, topk_w):
        step = float(rt._ctx.step)
        moe_h, shared_h = snapshot(st.moe.hist), snapshot(st.shared.hist)
        pair_v, pair_ts, pair_cnt = snapshot(st.experts.hist)
        ids, ref = st.experts.ids.clone(), st.experts.ref_ids.clone()
        out = real(rt, block, st, flat, topk_idx, topk_w)
        whole, shared = linear(*moe_h, step), linear(*shared_h, step)
        pairs = linear(pair_v, pair_ts, pair_cnt, step).view(-1, k, D)
        expected = whole.clone()
        moved = 0
        for t in range(flat.shape[0]):
            now = [int(e) for e in topk_idx[t]]
            if set(now) == {int(e) for e in ref[t]}:
                continue
            moved += 1
            value = shared[t].clone()
            for j, e in enumerate(now):
                kept = [s for s in range(k) if int(ids[t, s]) == e]
                branch_out = pairs[t, kept[0]] if kept else model.blocks[block.index].moe.experts[e](flat[t:t + 1])[0]
                value += topk_w[t, j].float() * branch_out.float()
            expected[t] = value
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        checked.append((rt._ctx.step, block.index, moved))
        return out

    monkeypatch.setattr(branch, "routing_forecast", spy)
    rt = ReplayRuntime(level_schedule(ROUTING), device_path=device_path)
    replay(model, rt)
    assert sorted({(s, b) for s, b, _ in checked}) == [(s, b) for s in FORECAST_STEPS for b in range(TINY.depth)]
    moved = sum(m for _, _, m in checked)
    rows = 2 * len(LABELS) * TINY.num_tokens
    assert 0 < moved < len(checked) * rows // 2        # routing moved for some tokens, not for most
    assert 0 < rt.counters.expert[FORECAST_STEPS].sum() < rt.counters.pairs[FORECAST_STEPS].sum() // 4


def test_routing_host_and_device_paths_and_lean_flag_agree():
    model = make_tiny(seed=2)
    s = level_schedule(ROUTING)
    host, device, general = (ReplayRuntime(s, device_path=False), ReplayRuntime(s, device_path=True),
                             ReplayRuntime(s, device_path=False, lean=False))
    a, b, c = replay(model, host), replay(model, device), replay(model, general)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    for name in ("expert", "router", "pairs", "tokens"):
        assert (getattr(host.counters, name) == getattr(device.counters, name)).all(), name
        assert (getattr(host.counters, name) == getattr(general.counters, name)).all(), name


def test_a_router_that_never_moves_makes_routing_the_token_level_and_computes_no_pair():
    """Zero router weights: every token keeps its experts, so every token takes the per-token forecast; with
    constant gates the branch level is the same forecast too (a linear forecast of a fixed-weight sum)."""
    model = make_tiny(seed=3)
    with torch.no_grad():
        for block in model.blocks:
            block.moe.gate.weight.zero_()
    routing, token, per_branch = (ReplayRuntime(level_schedule(rule)) for rule in (ROUTING, REUSE, ALWAYS))
    out = {name: replay(model, rt) for name, rt in (("routing", routing), ("token", token), ("branch", per_branch))}
    torch.testing.assert_close(out["routing"], out["token"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["routing"], out["branch"], rtol=1e-4, atol=1e-5)
    assert routing.counters.expert[FORECAST_STEPS].sum() == 0
    assert routing.counters.router[FORECAST_STEPS].sum() == len(FORECAST_STEPS) * TINY.depth * 2 * len(LABELS) * TINY.num_tokens
    assert token.counters.router[FORECAST_STEPS].sum() == 0


def test_routing_rule_is_refused_where_it_does_not_apply():
    E = TINY.num_experts
    with pytest.raises(ScheduleError, match="moe rule only"):
        BlockRule(ROUTING, ROUTING, REUSE, (REUSE,) * E)
    with pytest.raises(ScheduleError, match="every expert rule must be reuse"):
        BlockRule(REUSE, ROUTING, REUSE, (ALWAYS,) + (REUSE,) * (E - 1))
    s = level_schedule(ROUTING)
    assert Schedule.from_json(s.to_json()).steps == s.steps          # written and read back (format 6)
    assert s.to_json()["steps"][1]["blocks"][0]["moe"] == "routing"


def test_a_routing_aware_schedule_with_its_predicted_ratio_loads():
    """A derived routing-aware schedule records ``predicted_flops_ratio``; reading it back checks that ratio against
    the least share its rules compute, which for a routing-aware MoE is the router (as at the branch level)."""
    import dataclasses

    branch_level, routing = level_schedule(ALWAYS), level_schedule(ROUTING)
    assert routing.computed_share_floor() == pytest.approx(branch_level.computed_share_floor())
    assert level_schedule(REUSE).computed_share_floor() < routing.computed_share_floor() < 1
    derived = dataclasses.replace(routing, predicted_flops_ratio=routing.computed_share_floor() + 0.02)
    assert Schedule.from_json(derived.to_json()).predicted_flops_ratio == derived.predicted_flops_ratio
    edited = dataclasses.replace(routing, predicted_flops_ratio=routing.computed_share_floor() / 2)
    with pytest.raises(ScheduleError, match="contradict"):
        Schedule.from_json(edited.to_json())
