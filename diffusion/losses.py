"""Training objectives of the project's DiT-MoE models, one per ``DiTMoEConfig.objective``.

- ``rectified_flow`` (the demo model, the public XL/G recipe): logit-normal ``t``,
  ``x_t = (1 - t) x0 + t noise``, the model's first C channels predict ``v = noise - x0``; loss = MSE.
- ``ddpm_eps`` (the public S/B recipe, improved-DDPM ``training_losses`` with ``LEARNED_RANGE``
  variance and ``MSE`` loss type): linear betas over ``train_timesteps`` (1000), integer ``t`` uniform,
  ``x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) noise``; the first C channels predict ``noise``, the next C the
  interpolation ``v`` of the log variance between the clipped posterior variance and beta. Loss = MSE on
  epsilon + ``L_vb`` (KL of the true posterior to the model's, in bits per dimension; the decoder NLL at
  ``t = 0``), with the mean's gradient stopped so ``L_vb`` only trains the variance.

The beta and posterior quantities come from :class:`moeca.diffusion.samplers.DiffusionSchedule`, the same
code that samples the model. ``draw`` takes the random times and noise from the training generator,
``loss`` computes the batch-mean loss terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moeca.diffusion.samplers import DiffusionSchedule


@dataclass(frozen=True)
class ObjectiveLoss:
    """One training step's loss terms, each a scalar tensor. ``total`` is what is back-propagated
    (without the routing loss, which the training loop adds); ``terms`` are logged (floats)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class RectifiedFlowObjective:
    """Rectified flow with logit-normal time sampling; ``t`` in (0, 1) is what the model sees."""

    name = "rectified_flow"

    def draw(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Times ``t [B]`` (float in (0, 1)) and noise like ``x0``, drawn from ``gen`` in this order."""
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
        return t, torch.randn(x0.shape, generator=gen)

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> ObjectiveLoss:
        """``x0 [B, C, H, W]`` in [-1, 1], ``y [B]`` labels (already CFG-dropped), ``t``/``noise`` from
        :meth:`draw`."""
        c = x0.shape[1]
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * noise
        pred = model(xt, t, y)[:, :c]
        mse = ((pred - (noise - x0)) ** 2).mean()
        return ObjectiveLoss(mse, {"mse": mse})


class DDPMEpsObjective:
    """Epsilon prediction with learned-range variance (DiT S/B, improved DDPM).

    ``train_timesteps``: length of the linear beta schedule (1e-4..0.02 at 1000); the model sees the
    integer timestep ``t`` in ``0..train_timesteps-1``, as the DDPM sampler feeds it.
    """

    name = "ddpm_eps"

    def __init__(self, train_timesteps: int = 1000):
        s = DiffusionSchedule.build(train_timesteps, train_timesteps)
        if len(s.timesteps) != train_timesteps:
            raise ValueError(f"train_timesteps={train_timesteps} did not give an unrespaced schedule")
        self.train_timesteps = train_timesteps
        self.sqrt_ac = torch.from_numpy(np.sqrt(s.alphas_cumprod))       # float64 [T], indexed by t
        self.sqrt_1m_ac = torch.from_numpy(np.sqrt(1.0 - s.alphas_cumprod))
        self.log_betas = torch.from_numpy(np.log(s.betas))
        self.post_log_var = torch.from_numpy(s.posterior_log_variance_clipped)
        self.post_coef1 = torch.from_numpy(s.posterior_mean_coef1)
        self.post_coef2 = torch.from_numpy(s.posterior_mean_coef2)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[t.cpu()].to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t`` for integer timesteps ``t [B]``."""
        return self._at(self.sqrt_ac, t, x0) * x0 + self._at(self.sqrt_1m_ac, t, x0) * noise

    def vb_terms(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 var_values: torch.Tensor) -> torch.Tensor:
        """Per-sample ``L_vb`` in bits per dimension ``[B]`` (KL for ``t > 0``, decoder NLL at ``t = 0``)."""
        true_mean = self._at(self.post_coef1, t, x0) * x0 + self._at(self.post_coef2, t, x0) * xt
        true_log_var = self._at(self.post_log_var, t, x0)
        frac = (var_values + 1) / 2
        model_log_var = frac * self._at(self.log_betas, t, x0) + (1 - frac) * true_log_var
        pred_x0 = (xt - self._at(self.sqrt_1m_ac, t, x0) * eps) / self._at(self.sqrt_ac, t, x0)
        model_mean = self._at(self.post_coef1, t, x0) * pred_x0 + self._at(self.post_coef2, t, x0) * xt
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def draw(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer timesteps ``t [B]`` uniform in ``0..train_timesteps-1`` and noise like ``x0``."""
        t = torch.randint(0, self.train_timesteps, (x0.shape[0],), generator=gen)
        return t, torch.randn(x0.shape, generator=gen)

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> ObjectiveLoss:
        """``x0 [B, C, H, W]`` in [-1, 1], ``y [B]`` labels (already CFG-dropped), ``t``/``noise`` from
        :meth:`draw`. Needs a model with ``learn_sigma`` (2 x C output channels)."""
        c = x0.shape[1]
        if model.config.out_channels != 2 * c:
            raise ValueError("the ddpm_eps objective trains learned-range variance: the model config needs "
                             "learn_sigma=True (2 x in_channels outputs)")
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t.to(x0.device), y)
        eps, var_values = out[:, :c], out[:, c:]
        mse = ((eps - noise) ** 2).mean()
        vb = self.vb_terms(x0, xt, t.to(x0.device), eps.detach(), var_values).mean()
        return ObjectiveLoss(mse + vb, {"mse": mse, "vb": vb})


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of data ``x`` in [-1, 1] under a Gaussian discretised into
    256 bins, as the reference decoder term (the bin width the public recipe uses)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def objective_for(name: str, train_timesteps: int = 1000):
    """The training objective named by ``DiTMoEConfig.objective``."""
    if name == "rectified_flow":
        return RectifiedFlowObjective()
    if name == "ddpm_eps":
        return DDPMEpsObjective(train_timesteps)
    raise ValueError(f"unknown training objective {name!r}; choose rectified_flow or ddpm_eps")
