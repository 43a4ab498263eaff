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



def test_lean_block_runs_on_forecast_steps_only_and_general_path_never(monkeypatch):
    """:func:`branch_block` runs every block of every forecast step after the first refresh, and never with
    ``lean=False`` (the reference above is then a different code path, not the same one twice)."""
    import moeca.replay.runtime as runtime_module

    seen: list[tuple[int, int]] = []
    real = runtime_module.branch_block

    def spy(rt, block, st, x, c):
        seen.append((rt._ctx.step, block.index))
        return real(rt, block, st, x, c)

    monkeypatch.setattr(runtime_module, "branch_block", spy)
    model = make_tiny(seed=1)
    s = branch_schedule()
    replay(model, ReplayRuntime(s))
    forecast_steps = [1, 2, 4, 5, 7, 8]
    assert sorted(set(seen)) == [(step, b) for step in forecast_steps for b in range(TINY.depth)]
    seen.clear()
    replay(model, ReplayRuntime(s, lean=False))
    assert seen == []


@pytest.mark.parametrize("device_path", [False, True])
def test_lean_step_on_the_shipped_model_matches_the_general_path(device_path):
    """The trained demo model, 20 steps, refreshes every 4: the lean step's samples equal the general path's
    within float tolerance and every counter is the same (routing moves on the trained model: new pairs ran)."""
    from moeca.bench.steps import level_schedule
    from moeca.diffusion.samplers import default_sampler
    from moeca.models.registry import load_model

    model = load_model("demo", device="cpu")
    sampler = default_sampler(model.config.objective, num_steps=20, cfg_scale=1.5, cfg_mode="batched")
    labels = torch.tensor([3, 7, 1, 9])
    s = level_schedule(model, sampler, tuple(range(0, 20, 4)), "branch")
    out = {}
    for lean in (True, False):
        rt = ReplayRuntime(s, device_path=device_path, lean=lean)
        with torch.inference_mode(), model.use_runtime(rt):
            out[lean] = (sample(model, sampler, labels, seed=2), rt.counters)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-5)
    lean_c, general_c = out[True][1], out[False][1]
    assert lean_c.totals() == general_c.totals()
    for name in ("expert", "gather", "forecast", "router", "pairs", "tokens", "shared", "attn_q"):
        assert (getattr(lean_c, name) == getattr(general_c, name)).all(), name
    assert lean_c.expert[[5, 6, 7]].sum() > 0


def test_sorted_new_pairs_equal_the_per_expert_loop():
    """:func:`sorted_swiglu` (rows sorted by expert, one gate-up GEMM per touched expert) gives the models'
    per-expert loop's outputs in the caller's row order, with uneven rows per expert and with an expert that has no
    row; :func:`few_pairs` takes it."""
    import numpy as np

    from moeca.models.dispatch import expert_stack, run_experts
    from moeca.replay.units.branch import few_pairs, sorted_swiglu

    model = make_tiny(seed=3)
    block = model.blocks[1]
    E = TINY.num_experts
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.arange(E), torch.randint(0, E, (3 * E,), generator=gen)])[torch.randperm(4 * E, generator=gen)]
    rows = torch.randn(ids.shape[0], TINY.hidden_size, generator=gen)
    with torch.inference_mode():
        ref = run_experts(block, rows, ids, path="loop")
        counts = np.bincount(ids.numpy(), minlength=E)
        assert counts.min() > 0 and counts.max() > counts.min()
        got = sorted_swiglu(expert_stack(block.moe), rows, ids.numpy())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        rt = ReplayRuntime(branch_schedule())
        torch.testing.assert_close(few_pairs(rt, block, rows, ids), ref, rtol=1e-5, atol=1e-6)
        some = ids != 0                                                      # expert 0 has no row
        torch.testing.assert_close(few_pairs(rt, block, rows[some], ids[some]), ref[some], rtol=1e-5, atol=1e-6)
