"""Samplers: DDPM with respacing and learned-range variance, DDIM, rectified-flow Euler; CFG.

All samplers are deterministic under a seed: noise is drawn from a CPU ``torch.Generator`` and moved
to the model's device, so a seed gives the same samples on CPU and CUDA (up to kernel rounding).
Each model call carries a :class:`ForwardContext` so caching runtimes know the step and CFG branch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import numpy as np
import torch

from moeca.models.allocator import keep_freed_memory
from moeca.models.runtime import ForwardContext

SamplerKind = Literal["ddpm", "ddim", "rectified_flow"]
CfgMode = Literal["batched", "separate"]


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample.

    kind: ``ddpm`` (ancestral, learned-range variance when the model predicts it), ``ddim`` (eta
    controls stochasticity, 0 = deterministic) or ``rectified_flow`` (Euler from t=1 to t=0).
    num_steps: sampling steps (DDPM/DDIM respace ``train_timesteps`` evenly down to this many).
    cfg_scale: classifier-free guidance scale; 1.0 disables guidance (one call per step).
    cfg_mode: ``batched`` = one ``[cond; uncond]`` call; ``separate`` = two calls per step.
    cfg_channels: guide only the first N output channels (the public DDPM code guides 3); None = all
    predicted channels.
    """

    kind: SamplerKind = "rectified_flow"
    num_steps: int = 50
    cfg_scale: float = 1.0
    cfg_mode: CfgMode = "batched"
    cfg_channels: int | None = None
    train_timesteps: int = 1000
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("ddpm", "ddim", "rectified_flow"):
            raise ValueError(f"unknown sampler {self.kind!r}; choose ddpm, ddim or rectified_flow")
        if self.cfg_mode not in ("batched", "separate"):
            raise ValueError(f"cfg_mode must be 'batched' or 'separate', got {self.cfg_mode!r}")
        if not 1 <= self.num_steps <= (self.train_timesteps if self.kind != "rectified_flow" else 10_000):
            raise ValueError(f"num_steps={self.num_steps} must be in 1..{self.train_timesteps} for {self.kind}")
        if not np.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if not np.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ValueError(f"cfg_channels must be >= 1 (or None for all predicted channels), got {self.cfg_channels}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


SAMPLERS_FOR_OBJECTIVE = {"ddpm_eps": ("ddpm", "ddim"), "rectified_flow": ("rectified_flow",)}
"""Samplers that read a model's output the way it was trained: DDPM/DDIM read noise (epsilon), the
Euler sampler reads a rectified-flow velocity. Any other pairing samples noise without an error."""


def check_sampler_objective(kind: str, objective: str, what: str = "--sampler") -> None:
    """Refuse a sampler that cannot use a model trained for ``objective``; ``what`` names the input."""
    allowed = SAMPLERS_FOR_OBJECTIVE.get(objective)
    if allowed is None:
        raise ValueError(f"model objective {objective!r} is unknown; expected one of "
                         f"{', '.join(SAMPLERS_FOR_OBJECTIVE)}")
    if kind not in allowed:
        reads = "a velocity" if objective == "rectified_flow" else "the noise epsilon"
        raise ValueError(f"{what} {kind!r} does not match the model: it was trained for the {objective} objective "
                         f"(its output is {reads}), which the {kind} sampler would misread and return noise as if it "
                         f"were a valid sample; use {' or '.join(allowed)}")


def default_cfg_mode(config) -> CfgMode:
    """The one rule for the default CFG mode, read from the architecture alone (so the same weights get the same
    mode whether they are loaded by ``--model`` or by ``--checkpoint``): ``separate`` (two calls per step) for the
    public XL/G architectures (``qk_norm`` attention), as their reference code samples them; ``batched`` (one
    ``[cond; uncond]`` call) for every other model, the shipped ones included. ``--cfg-mode`` overrides it."""
    return "separate" if config.qk_norm else "batched"


def default_sampler_for(config, **overrides) -> SamplerConfig:
    """:func:`default_sampler` of ``config``'s objective with :func:`default_cfg_mode`; ``overrides`` win."""
    return default_sampler(config.objective, **{"cfg_mode": default_cfg_mode(config), **overrides})


def default_sampler(objective: str, **overrides) -> SamplerConfig:
    """The reference sampler for a model objective: DDPM for ``ddpm_eps``, Euler for ``rectified_flow``."""
    if objective == "ddpm_eps":
        return replace(SamplerConfig(kind="ddpm", num_steps=250, cfg_scale=1.5, cfg_channels=3), **overrides)
    return replace(SamplerConfig(kind="rectified_flow", num_steps=50, cfg_scale=1.5, cfg_mode="separate"),
                   **overrides)


# ----------------------------------------------------------------------------- guided model call
class GuidedDenoiser:
    """Calls the model once per step (or twice, for separate CFG) and applies guidance.

    ``__call__(x [B,C,H,W], t [B], y [B], step) -> model output [B, out_channels, H, W]``.
    """

    def __init__(self, model: torch.nn.Module, cfg: SamplerConfig):
        self.model, self.cfg = model, cfg
        self.null = model.config.num_classes

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        n = self.cfg.num_steps
        if not self.cfg.guided:
            return self._checked(self.model(x, t, y, ForwardContext(step, n, "none")))
        y_null = torch.full_like(y, self.null)
        if self.cfg.cfg_mode == "batched":
            out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]),
                             ForwardContext(step, n, "batched"))
            cond, uncond = out.chunk(2)
        else:
            cond = self.model(x, t, y, ForwardContext(step, n, "cond"))
            uncond = self.model(x, t, y_null, ForwardContext(step, n, "uncond"))
        return self._checked(self.guide(cond, uncond))

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        pred_channels = self.model.config.in_channels
        # never guide the variance channels: a 1-channel model guides its one predicted channel
        m = min(self.cfg.cfg_channels or pred_channels, pred_channels)
        guided = uncond[:, :m] + self.cfg.cfg_scale * (cond[:, :m] - uncond[:, :m])
        return torch.cat([guided, cond[:, m:]], dim=1)

    @staticmethod
    def _checked(out: torch.Tensor) -> torch.Tensor:
        """Per step on the CPU (free there); on an accelerator the run is checked once, at its end
        (:func:`check_finite_output`), so a step never waits for the device."""
        if out.device.type == "cpu":
            check_finite_output(out)
        return out


def check_finite_output(out: torch.Tensor, what: str = "model output") -> None:
    """Raise ``FloatingPointError`` naming the count if ``out`` holds NaN/Inf (one host sync)."""
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise FloatingPointError(f"{what} has {bad} non-finite values (NaN/Inf); check the checkpoint "
                                 "weights and the dtype (try float32)")


# ----------------------------------------------------------------------------- schedules
def linear_betas(train_timesteps: int) -> np.ndarray:
    scale = 1000 / train_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, train_timesteps, dtype=np.float64)


def respaced_timesteps(train_timesteps: int, num_steps: int) -> list[int]:
    """Evenly spaced subset of ``range(train_timesteps)`` with ``num_steps`` entries, ascending
    (the reference ``space_timesteps(T, str(num_steps))`` with one section)."""
    if num_steps == 1:
        return [0]
    frac = (train_timesteps - 1) / (num_steps - 1)
    return sorted({round(i * frac) for i in range(num_steps)})


@dataclass(frozen=True)
class DiffusionSchedule:
    """Respaced DDPM quantities, index ``i`` over used timesteps (ascending). Float64 numpy arrays."""

    timesteps: np.ndarray          # original timestep index of each respaced step, fed to the model
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def build(cls, train_timesteps: int, num_steps: int) -> "DiffusionSchedule":
        base_ac = np.cumprod(1.0 - linear_betas(train_timesteps))
        used = respaced_timesteps(train_timesteps, num_steps)
        betas, last = [], 1.0
        for t in used:
            betas.append(1 - base_ac[t] / last)
            last = base_ac[t]
        betas = np.array(betas)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(
            np.maximum(post_var, 1e-20))
        return cls(
            timesteps=np.array(used), betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
            posterior_variance=post_var, posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        )


def ddim_sigma(eta: float, ac, ac_prev):
    """DDIM's noise scale of a step from ``alphas_cumprod`` ``ac`` and its predecessor ``ac_prev`` (numbers or
    arrays): ``eta * sqrt((1 - ac_prev) / (1 - ac)) * sqrt(1 - ac / ac_prev)``; eta 0 is deterministic."""
    return eta * np.sqrt((1 - ac_prev) / (1 - ac)) * np.sqrt(1 - ac / ac_prev)


def model_share(cfg: SamplerConfig) -> np.ndarray:
    """``[num_steps]`` (step 0 = noisiest): the share of each step's update of ``x`` that the model's
    prediction decides, ``c / sqrt(c**2 + sigma**2)``.

    ``c`` is the coefficient of the prediction (epsilon or velocity) in the update and ``sigma`` the
    standard deviation of the fresh noise the step adds. Where fresh noise dominates (early DDPM steps), an
    error in the prediction is a small part of what the step changes and later steps still correct it;
    where it does not (the last DDPM steps, every Euler and deterministic DDIM step: share 1), the error stays
    in the sample. Dimensionless, in (0, 1].
    """
    if cfg.kind == "rectified_flow":
        return np.ones(cfg.num_steps)
    sched = DiffusionSchedule.build(cfg.train_timesteps, cfg.num_steps)
    i = np.arange(len(sched.timesteps))[::-1]                 # sampling order: noisiest first
    ac, ac_prev = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i]
    if cfg.kind == "ddim":
        sigma = ddim_sigma(cfg.eta, ac, ac_prev)
        c = np.abs(np.sqrt(np.maximum(1 - ac_prev - sigma ** 2, 0.0))
                   - np.sqrt(ac_prev) * np.sqrt(1 - ac) / np.sqrt(ac))
    else:   # posterior mean coef1 * x0, x0 = (x - sqrt(1 - ac) eps) / sqrt(ac); the last step adds no noise
        c = sched.posterior_mean_coef1[i] * np.sqrt(1 - ac) / np.sqrt(ac)
        sigma = np.sqrt(sched.posterior_variance[i])
    sigma = np.where(i == 0, 0.0, sigma)
    return np.where(c > 0, c / np.sqrt(c ** 2 + sigma ** 2 + 1e-300), 1.0)


# ----------------------------------------------------------------------------- sampling
def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(model: torch.nn.Module, cfg: SamplerConfig, labels: torch.Tensor, seed: int = 0,
           noise: torch.Tensor | None = None,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Sample images ``[B, C, H, W]`` for ``labels [B]``.

    The model's runtime is reset first, so caches never leak between calls. ``noise`` overrides the
    seeded initial noise; DDPM/DDIM step noise comes from a generator seeded with ``seed + 1``. Labels
    are checked once per run; NaN/Inf outputs per step on the CPU, once at the end on an accelerator.
    ``on_step(step)`` is called after each step (progress bars). The process keeps freed CPU memory from
    the first call on (:func:`moeca.models.allocator.keep_freed_memory`: steps reuse each other's pages
    instead of page-faulting them in).
    """
    keep_freed_memory()
    mc = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    shape = (labels.shape[0], mc.in_channels, mc.input_size, mc.input_size)
    x = initial_noise(shape, seed, device, dtype) if noise is None else noise.to(device=device, dtype=dtype)
    if hasattr(model, "check_labels"):
        model.check_labels(labels)      # once per run, on the host (forwards on a GPU never read them back)
    labels = labels.to(device)
    model.runtime.reset()
    denoise = GuidedDenoiser(model, cfg)
    step_gen = torch.Generator().manual_seed(seed + 1)
    if cfg.kind == "rectified_flow":
        x = _rectified_flow(denoise, x, labels, cfg, on_step)
    else:
        x = _gaussian(denoise, x, labels, cfg, step_gen, on_step)
    model.runtime.reset()
    if device.type != "cpu":
        check_finite_output(x, "the sampled batch")
    return x


def _rectified_flow(denoise, x, labels, cfg, on_step):
    n = cfg.num_steps
    dt = 1.0 / n
    c = x.shape[1]
    for step in range(n):
        t = torch.full((x.shape[0],), (n - step) / n, device=x.device, dtype=x.dtype)
        v = denoise(x, t, labels, step)[:, :c]
        x = x - dt * v
        if on_step:
            on_step(step)
    return x


def _gaussian(denoise, x, labels, cfg, gen, on_step):
    sched = DiffusionSchedule.build(cfg.train_timesteps, cfg.num_steps)
    c = x.shape[1]
    n = len(sched.timesteps)
    for step, i in enumerate(range(n - 1, -1, -1)):
        t = torch.full((x.shape[0],), int(sched.timesteps[i]), device=x.device, dtype=torch.long)
        out = denoise(x, t, labels, step)
        eps = out[:, :c]
        ac, ac_prev = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i]
        x0 = (x - np.sqrt(1.0 - ac) * eps) / np.sqrt(ac)
        if cfg.kind == "ddim":
            sigma = ddim_sigma(cfg.eta, ac, ac_prev)
            x = np.sqrt(ac_prev) * x0 + np.sqrt(max(1 - ac_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0 and i > 0:
                x = x + sigma * _noise_like(x, gen)
        else:
            mean = sched.posterior_mean_coef1[i] * x0 + sched.posterior_mean_coef2[i] * x
            if out.shape[1] == 2 * c:  # learned-range variance
                frac = (out[:, c:] + 1) / 2
                min_log = sched.posterior_log_variance_clipped[i]
                max_log = np.log(sched.betas[i])
                log_var = frac * max_log + (1 - frac) * min_log
            else:
                log_var = torch.full_like(x, float(sched.posterior_log_variance_clipped[i]))
            x = mean + (torch.exp(0.5 * log_var) * _noise_like(x, gen) if i > 0 else 0.0)
        if on_step:
            on_step(step)
    return x


def _noise_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
