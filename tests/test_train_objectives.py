"""The shared training loop and its two objectives (``diffusion/losses.py``, ``diffusion/train_demo.py``)."""
import json
import math

import numpy as np
import pytest
import torch

from moeca.models.config import DiTMoEConfig
from moeca.diffusion.losses import (DDPMEpsObjective, RectifiedFlowObjective, discretized_gaussian_log_likelihood,
                                         normal_kl, objective_for)
from moeca.models.dit_moe import DiTMoE
from moeca.models.registry import SHIPPED_MODELS, randomize_zero_init
from moeca.diffusion.samplers import DiffusionSchedule, linear_betas
from moeca.diffusion.train_demo import RECIPES, TrainConfig, train_demo

TINY_DDPM = DiTMoEConfig(name="tiny-ddpm", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                         num_heads=2, num_experts=4, top_k=2, num_classes=10, learn_sigma=True, objective="ddpm_eps")


def test_ddpm_objective_uses_the_samplers_linear_schedule():
    obj = DDPMEpsObjective(1000)
    ac = np.cumprod(1 - linear_betas(1000))
    assert torch.allclose(obj.sqrt_ac, torch.from_numpy(np.sqrt(ac)))
    assert obj.log_betas[0].item() == pytest.approx(math.log(1e-4)) and obj.log_betas[-1].item() == pytest.approx(
        math.log(0.02))
    sched = DiffusionSchedule.build(1000, 1000)
    assert torch.allclose(obj.post_log_var, torch.from_numpy(sched.posterior_log_variance_clipped))


def test_vb_is_zero_for_the_true_posterior_and_positive_otherwise():
    obj = DDPMEpsObjective(1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([1, 10, 100, 400, 800, 999])
    xt = obj.q_sample(x0, t, noise)
    # eps = the true noise and var_values = -1 (log variance = the clipped posterior's) -> KL = 0
    # (t = 1: the clipped log variance is the posterior's at t = 1 exactly)
    exact = obj.vb_terms(x0, xt, t, noise, torch.full_like(x0, -1.0))
    assert exact.abs().max().item() < 1e-6
    wrong = obj.vb_terms(x0, xt, t, noise + 0.5, torch.full_like(x0, 0.5))
    assert (wrong > 1e-4).all()


def test_vb_at_t0_is_the_decoder_nll_in_bits():
    obj = DDPMEpsObjective(1000)
    x0 = torch.zeros(1, 1, 8, 8)
    t = torch.zeros(1, dtype=torch.long)
    xt = obj.q_sample(x0, t, torch.zeros_like(x0))
    vb = obj.vb_terms(x0, xt, t, torch.zeros_like(x0), torch.full_like(x0, -1.0))
    assert vb.item() > 0  # a probability mass below 1, as bits
    ll = discretized_gaussian_log_likelihood(x0, torch.zeros_like(x0), torch.full_like(x0, math.log(0.01)))
    assert (ll <= 0).all()


def test_normal_kl_of_identical_gaussians_is_zero():
    m, lv = torch.randn(5), torch.randn(5)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-7
    assert (normal_kl(m, lv, m + 1, lv) > 0).all()


def test_vb_trains_only_the_variance_channels():
    torch.manual_seed(0)
    model = DiTMoE(TINY_DDPM).train()
    randomize_zero_init(model, 0)
    obj = DDPMEpsObjective(1000)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1
    t, noise = obj.draw(x0, gen)
    xt = obj.q_sample(x0, t, noise)
    out = model(xt, t, torch.arange(4)).detach().requires_grad_(True)
    eps, var = out[:, :1], out[:, 1:]
    obj.vb_terms(x0, xt, t, eps.detach(), var).mean().backward()
    assert out.grad[:, :1].abs().max().item() == 0.0  # the mean's gradient is stopped
    assert out.grad[:, 1:].abs().max().item() > 0.0


def test_ddpm_objective_refuses_a_model_without_learned_variance():
    model = DiTMoE(DiTMoEConfig(**{**TINY_DDPM.to_dict(), "learn_sigma": False}))
    obj = DDPMEpsObjective(1000)
    x0 = torch.zeros(2, 1, 8, 8)
    t, noise = obj.draw(x0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="learn_sigma=True"):
        obj.loss(model, x0, torch.zeros(2, dtype=torch.long), t, noise)


def test_objective_for_names_the_choices():
    assert isinstance(objective_for("ddpm_eps"), DDPMEpsObjective)
    assert isinstance(objective_for("rectified_flow"), RectifiedFlowObjective)
    with pytest.raises(ValueError, match="rectified_flow or ddpm_eps"):
        objective_for("edm")


def test_training_loop_decreases_the_ddpm_loss_on_a_tiny_model(tmp_path):
    cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=1, log_every=2, threads=1, seed=0)
    log = train_demo(tmp_path, cfg, model_config=TINY_DDPM, progress=False,
                     shipped=SHIPPED_MODELS["demo-ddpm"])
    curve = log["loss_curve"]
    assert log["objective"] == "ddpm_eps" and log["complete"] and log["steps_done"] == 40
    assert {"loss", "vb", "aux"} <= set(curve[0])
    # zero-initialised output layer: the epsilon MSE starts near E[noise^2] = 1 and must fall clearly
    assert curve[0]["loss"] == pytest.approx(1.0, abs=0.1)
    assert np.mean([p["loss"] for p in curve[-3:]]) < 0.7 * curve[0]["loss"]
    assert (tmp_path / SHIPPED_MODELS["demo-ddpm"].weights).is_file()
    saved = json.loads((tmp_path / "training_log.json").read_text())
    assert saved["model"] == "demo-ddpm" and saved["model_config"]["learn_sigma"] is True


def test_periodic_checkpoints_leave_a_usable_partial_run(tmp_path, monkeypatch):
    from moeca.diffusion import train_demo as td

    written = []
    real = td._write_outputs

    def spy(out_dir, ema, shipped, cfg, losses, steps_done, seconds, train_samples):
        log = real(out_dir, ema, shipped, cfg, losses, steps_done, seconds, train_samples)
        written.append((steps_done, log["complete"], (out_dir / shipped.weights).is_file()))
        return log

    monkeypatch.setattr(td, "_write_outputs", spy)
    td.train_demo(tmp_path, TrainConfig(steps=5, batch_size=8, log_every=1, threads=1, checkpoint_every=2),
                  model_config=TINY_DDPM, progress=False, shipped=SHIPPED_MODELS["demo-ddpm"])
    assert written == [(2, False, True), (4, False, True), (5, True, True)]


def test_train_config_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="TrainConfig.batch_size must be >= 1"):
        TrainConfig(batch_size=0)


def test_recipes_cover_every_shipped_model():
    assert set(RECIPES) == set(SHIPPED_MODELS)
    assert RECIPES["demo"] == TrainConfig()  # the shipped demo model's recipe is unchanged
