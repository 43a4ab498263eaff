"""Samplers: determinism, hand-computed steps, CFG modes, respacing."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from moeca.diffusion.samplers import (DiffusionSchedule, SamplerConfig, initial_noise, respaced_timesteps, sample)

from conftest import TINY, make_tiny

DDPM_TINY = dataclasses.replace(TINY, name="tiny-ddpm", learn_sigma=True, objective="ddpm_eps")
LABELS = torch.tensor([0, 1, 2])


@pytest.mark.parametrize("kind", ["rectified_flow", "ddpm", "ddim"])
def test_deterministic_under_seed(kind):
    model = make_tiny(DDPM_TINY if kind != "rectified_flow" else TINY)
    cfg = SamplerConfig(kind=kind, num_steps=4, cfg_scale=2.0)
    a = sample(model, cfg, LABELS, seed=7)
    b = sample(model, cfg, LABELS, seed=7)
    c = sample(model, cfg, LABELS, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_rectified_flow_one_step_by_hand():
    model = make_tiny()
    cfg = SamplerConfig(kind="rectified_flow", num_steps=1, cfg_scale=1.0)
    x = initial_noise((3, 1, 4, 4), 5, "cpu")
    with torch.no_grad():
        v = model(x, torch.ones(3), LABELS)
    torch.testing.assert_close(sample(model, cfg, LABELS, seed=5), x - v)


def test_rectified_flow_cfg_two_steps_by_hand():
    model = make_tiny()
    cfg = SamplerConfig(kind="rectified_flow", num_steps=2, cfg_scale=3.0, cfg_mode="separate")
    x = initial_noise((3, 1, 4, 4), 5, "cpu")
    null = torch.full_like(LABELS, TINY.num_classes)
    with torch.no_grad():
        for t in (1.0, 0.5):
            tt = torch.full((3,), t)
            vc, vu = model(x, tt, LABELS), model(x, tt, null)
            x = x - 0.5 * (vu + 3.0 * (vc - vu))
    torch.testing.assert_close(sample(model, cfg, LABELS, seed=5), x)


def test_batched_and_separate_cfg_agree():
    model = make_tiny()
    a = sample(model, SamplerConfig(num_steps=3, cfg_scale=2.5, cfg_mode="batched"), LABELS, seed=1)
    b = sample(model, SamplerConfig(num_steps=3, cfg_scale=2.5, cfg_mode="separate"), LABELS, seed=1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ddim_one_step_by_hand():
    model = make_tiny(DDPM_TINY)
    cfg = SamplerConfig(kind="ddim", num_steps=2, cfg_scale=1.0)
    sched = DiffusionSchedule.build(1000, 2)
    assert list(sched.timesteps) == [0, 999]
    x = initial_noise((3, 1, 4, 4), 0, "cpu")
    with torch.no_grad():
        for i in (1, 0):
            eps = model(x, torch.full((3,), int(sched.timesteps[i])), LABELS)[:, :1]
            ac, ac_prev = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i]
            x0 = (x - np.sqrt(1 - ac) * eps) / np.sqrt(ac)
            x = np.sqrt(ac_prev) * x0 + np.sqrt(1 - ac_prev) * eps
    torch.testing.assert_close(sample(model, cfg, LABELS, seed=0), x)


def test_ddpm_learned_variance_last_step_by_hand():
    """With one step the ancestral update is the posterior mean at i=0 (no noise added)."""
    model = make_tiny(DDPM_TINY)
    cfg = SamplerConfig(kind="ddpm", num_steps=1, cfg_scale=1.0)
    sched = DiffusionSchedule.build(1000, 1)
    x = initial_noise((3, 1, 4, 4), 0, "cpu")
    with torch.no_grad():
        eps = model(x, torch.zeros(3, dtype=torch.long), LABELS)[:, :1]
    ac = sched.alphas_cumprod[0]
    x0 = (x - np.sqrt(1 - ac) * eps) / np.sqrt(ac)
    expected = sched.posterior_mean_coef1[0] * x0 + sched.posterior_mean_coef2[0] * x
    torch.testing.assert_close(sample(model, cfg, LABELS, seed=0), expected)


def test_respacing_matches_reference_spacing():
    ts = respaced_timesteps(1000, 250)
    assert len(ts) == 250 and ts[0] == 0 and ts[-1] == 999
    sched = DiffusionSchedule.build(1000, 250)
    base = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(sched.alphas_cumprod, base[ts], rtol=1e-10)


def test_forward_context_reaches_runtime():
    from moeca.models.runtime import Runtime

    class Spy(Runtime):
        def __init__(self):
            self.seen = []

        def begin_forward(self, model, ctx, x_tokens):
            self.seen.append((ctx.step, ctx.cfg_branch, x_tokens.shape[0]))

    model = make_tiny()
    spy = Spy()
    with model.use_runtime(spy):
        sample(model, SamplerConfig(num_steps=2, cfg_scale=2.0, cfg_mode="separate"), LABELS)
        sample(model, SamplerConfig(num_steps=2, cfg_scale=2.0, cfg_mode="batched"), LABELS)
    assert spy.seen == [(0, "cond", 3), (0, "uncond", 3), (1, "cond", 3), (1, "uncond", 3),
                        (0, "batched", 6), (1, "batched", 6)]


def test_bad_sampler_config():
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerConfig(kind="euler")
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig(kind="ddpm", num_steps=2000)


def test_nonfinite_output_is_reported():
    model = make_tiny()
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        sample(model, SamplerConfig(num_steps=2), LABELS)
