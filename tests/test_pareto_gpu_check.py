"""bench/gpu_check (issue 6): the CPU-side pieces only; the GPU run itself is a manual check."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from moeca.bench import gpu_check
from moeca.models.config import get_preset
from moeca.diffusion.samplers import sample
from moeca.replay.runtime import ReplayRuntime
from moeca.policy.schedule import validate_json

from conftest import TINY, make_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_script_fails_fast_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("interval", [3])
def test_schedules_are_matched_on_the_checked_shapes(interval):
    config, sampler = get_preset("S/2-8E2A"), gpu_check.sampler_config(50)
    schedules = gpu_check.matched_schedules(config, sampler, interval)
    assert set(schedules) == {"fora", "fora-forecast", "toca", "moeca"}
    goal = schedules["fora"][0].predicted_flops_ratio
    full_steps = {0} | {s for s in range(50) if (49 - s) % interval == 0}   # FORA's phase counts down from the last
    assert goal == pytest.approx(len(full_steps) / 50, abs=0.02)
    for method, (schedule, _) in schedules.items():
        validate_json(schedule.to_json())
        assert schedule.method == (method if method != "fora-forecast" else "custom")
        assert schedule.forecast == ("linear" if method in ("moeca", "fora-forecast") else "none")
        assert schedule.predicted_flops_ratio == pytest.approx(goal, abs=0.04), method


def test_moeca_shaped_schedule_replays_with_attention_reused_off_sync():
    from moeca.diffusion.samplers import SamplerConfig
    sampler = SamplerConfig(kind="rectified_flow", num_steps=16, cfg_scale=1.5, cfg_mode="batched")
    schedule = gpu_check.moeca_shaped(TINY, sampler, 4)
    model = make_tiny()
    runtime = ReplayRuntime(schedule)
    with model.use_runtime(runtime):
        out = sample(model, sampler, torch.tensor([0, 1]), seed=1)
    assert torch.isfinite(out).all()
    c = runtime.counters
    off_sync = [s for s in range(16) if not schedule.is_sync(s)]
    assert off_sync and (c.attn_q[off_sync] == 0).all()
    assert (c.expert[off_sync] < c.pairs[off_sync]).all()
    assert sorted(set(range(16)) - set(off_sync)) == [0, 4, 8, 12]
    assert (c.shared[off_sync] == 0).all()
