"""Counters count what runs: predicted (cost model) vs counted FLOPs for MoECa's branch rules, as the
baselines' test does for FORA; forecast work and padding on lines of their own."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.policy.cost import UnitCosts, branch_schedule_flops
from moeca.policy.schedule import ALWAYS, REUSE, BlockRule, ModelIdentity, Rule, SamplerIdentity, Schedule, StepRule
from moeca.replay.runtime import ReplayRuntime

STEPS = 8
SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=STEPS, cfg_scale=1.5)
LABELS = torch.tensor([0, 1, 2])


def _schedule(forecast: str, order: int, body: BlockRule) -> Schedule:
    steps = tuple(StepRule("compute", (body,) * TINY.depth) for _ in range(STEPS))
    return Schedule("moeca", ModelIdentity.of(TINY), SamplerIdentity.of(SAMPLER), steps, (0, 4), forecast=forecast,
                    forecast_order=order)


@pytest.mark.parametrize("forecast,order,body", [
    ("linear", 1, BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * 4)),                               # MoECa sync rule
    ("none", 1, BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * 4)),
    ("taylor", 2, BlockRule(Rule("fraction", 0.25), ALWAYS, Rule("fraction", 0.3),
                            (REUSE, Rule("fraction", 0.5), ALWAYS, REUSE))),
])
def test_predicted_flops_match_counted_for_moeca_rules(tiny_model, forecast, order, body):
    schedule = _schedule(forecast, order, body)
    rt = ReplayRuntime(schedule)
    with tiny_model.use_runtime(rt):
        sample(tiny_model, SAMPLER, LABELS, seed=1)
    counted = rt.counters.flops(UnitCosts.of(TINY))
    predicted = branch_schedule_flops(schedule, TINY, 2 * len(LABELS), rt.counters.expert)
    assert predicted == pytest.approx(counted, rel=1e-9)
    t = rt.counters.totals()
    assert t["expert"] < t["pairs"] and t["padded"] == 0 and t["gather"] > 0
    assert (t["forecast"] > 0) == (forecast != "none")


def test_cost_model_refuses_data_dependent_rules():
    with pytest.raises(ValueError, match="threshold"):
        branch_schedule_flops(_schedule("none", 1, BlockRule(Rule("threshold", 0.1), ALWAYS, REUSE, (REUSE,) * 4)),
                              TINY, 2, None)
