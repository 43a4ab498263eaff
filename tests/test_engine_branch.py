"""The branch level's lean forecast step (:mod:`moeca.replay.units.branch`): the same samples and the same
counters as the general selection path, on the host path and the device path, for every forecast order,
and it computes only the newly routed pairs (its device path traces as one graph:
``test_engine_device.py``'s "moeca forecast step")."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, make_tiny
from moeca.diffusion.samplers import SamplerConfig, sample
from moeca.policy.schedule import ALWAYS, REUSE, BlockRule, ModelIdentity, SamplerIdentity, Schedule, StepRule
from moeca.replay.runtime import ReplayRuntime

STEPS = 9
SAMPLER = SamplerConfig(kind="rectified_flow", num_steps=STEPS, cfg_scale=1.5)
LABELS = torch.tensor([0, 1, 2, 1, 0])
BODY = BlockRule(REUSE, ALWAYS, REUSE, (REUSE,) * TINY.num_experts)


def branch_schedule(forecast: str = "linear", order: int = 1) -> Schedule:
    """The ``sync`` rule at the branch level: refreshes at steps 0, 3 and 6, every branch forecast between."""
    full = BlockRule.full(TINY.num_experts)
    refresh = (0, 3, 6)
    steps = tuple(StepRule("compute", ((full if s in refresh else BODY),) * TINY.depth) for s in range(STEPS))
    return Schedule("moeca", ModelIdentity.of(TINY), SamplerIdentity.of(SAMPLER), steps, refresh, forecast=forecast,
                    forecast_order=order)


def replay(model, runtime: ReplayRuntime) -> torch.Tensor:
    with torch.inference_mode(), model.use_runtime(runtime):
        return sample(model, SAMPLER, LABELS, seed=5)


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("forecast,order", [("none", 1), ("linear", 1), ("taylor", 2)])
def test_lean_step_gives_the_general_paths_samples_and_counters(device_path, forecast, order):
    model = make_tiny(seed=1)
    s = branch_schedule(forecast, order)
    lean_rt = ReplayRuntime(s, device_path=device_path)
    general_rt = ReplayRuntime(s, device_path=device_path, lean=False)
    lean, general = replay(model, lean_rt), replay(model, general_rt)
    torch.testing.assert_close(lean, general, rtol=1e-5, atol=1e-6)
    assert lean_rt.counters.totals() == general_rt.counters.totals()
    for name in ("expert", "gather", "forecast", "router"):
        assert (getattr(lean_rt.counters, name) == getattr(general_rt.counters, name)).all(), name
    # the routing moved somewhere between refreshes, so new pairs ran on forecast steps, and only those
    forecast_steps = [1, 2, 4, 5, 7, 8]
    ran = lean_rt.counters.expert[forecast_steps].sum()
    assert 0 < ran < lean_rt.counters.pairs[forecast_steps].sum() // 4

