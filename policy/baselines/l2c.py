"""L2C baseline: learned per-step, per-layer reuse decisions (Learning-to-Cache).

Original method (Ma et al., "Learning-to-Cache: Accelerating Diffusion Transformer via Layer
Caching", NeurIPS 2024): every (step, layer) gets a router weight ``beta = sigmoid(theta) in [0, 1]``;
during training a layer's output is the interpolation ``beta * fresh + (1 - beta) * cached`` where the
cache holds that layer's output at the previous step. The routers are trained on calibration samples
(the model is frozen) to minimise the error of the model output against full compute plus a sparsity
penalty ``lambda * sum(beta)`` that pushes layers towards reuse. After training the routers are frozen
into a static schedule: a layer is reused at a step when its ``beta`` falls below a threshold; the
threshold sets the speed. Layers are attention and MLP sub-layers separately (here: attention and the
whole MoE update of each block); the first step is always computed.

This module holds the knobs (:class:`L2CConfig`), training (:func:`train_router`, returning
:class:`L2CRouter`) and the export rule (:meth:`L2CRouter.reuse_mask`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from moeca.models.runtime import Runtime

if TYPE_CHECKING:  # pragma: no cover
    from moeca.models.dit_moe import DiTMoE
    from moeca.models.samplers import SamplerConfig

UNITS = ("attn", "moe")
"""The two cacheable sub-layers of a block, in router order (last axis of the router tensors)."""


@dataclass(frozen=True)
class L2CConfig:
    """Knobs of L2C training and export.

    sparsity: ``lambda``, weight of the mean router value in the loss (the output error term is the
        relative MSE ``||out - out_full||^2 / ||out_full||^2`` of the model output at the step). Larger
        values push more layers towards reuse.
    iterations: Adam iterations per step (each step's routers only affect that step's loss, so steps
        are trained one after another on their own calibration inputs).
    lr: Adam learning rate on the router logits.
    init_logit: initial ``theta`` (sigmoid 3.0 = 0.95: start close to full compute).
    calibration_samples: number of calibration samples (labels cycle through the classes).
    calibration_seed: seed of the calibration noise (keep it apart from evaluation seeds).
    threshold: export rule, reuse where ``beta < threshold``. Ignored when ``reuse_fraction`` is set.
        ``0`` reuses nothing.
    reuse_fraction: alternative export rule: reuse the given fraction of all (step >= 1, block, unit)
        decisions, those with the lowest ``beta`` (ties broken by step, block, unit order).
    """

    sparsity: float = 0.02
    iterations: int = 15
    lr: float = 0.3
    init_logit: float = 3.0
    calibration_samples: int = 8
    calibration_seed: int = 1000
    threshold: float = 0.5
    reuse_fraction: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.sparsity) or self.sparsity < 0:
            raise ValueError(f"l2c sparsity must be a finite number >= 0, got {self.sparsity}")
        if self.iterations < 0 or self.calibration_samples < 1:
            raise ValueError(f"l2c iterations must be >= 0 and calibration_samples >= 1, got {self.iterations}, "
                             f"{self.calibration_samples}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"l2c threshold must be in [0, 1], got {self.threshold}")
        if self.reuse_fraction is not None and not 0 <= self.reuse_fraction <= 1:
            raise ValueError(f"l2c reuse_fraction must be in [0, 1] or None, got {self.reuse_fraction}")

    def training_key(self) -> dict:
        """The knobs that change the trained routers (export knobs excluded)."""
        return {"sparsity": self.sparsity, "iterations": self.iterations, "lr": self.lr,
                "init_logit": self.init_logit, "calibration_samples": self.calibration_samples,
                "calibration_seed": self.calibration_seed}

    def to_dict(self) -> dict:
        return {**self.training_key(), "threshold": self.threshold, "reuse_fraction": self.reuse_fraction}


@dataclass(frozen=True)
class L2CRouter:
    """Trained router values ``beta [num_steps, depth, 2]`` (units attn, moe) in [0, 1], float64.

    Step 0 is always 1 (computed). ``losses`` is the final relative output error per step (``[S]``).
    """

    beta: np.ndarray
    losses: np.ndarray
    meta: dict

    def reuse_mask(self, config: L2CConfig) -> np.ndarray:
        """Boolean ``[S, depth, 2]``: True where the (step, block, unit) is reused. Step 0 never is."""
        S = self.beta.shape[0]
        mask = np.zeros(self.beta.shape, dtype=bool)
        if S < 2:
            return mask
        body = self.beta[1:]
        if config.reuse_fraction is not None:
            k = int(round(config.reuse_fraction * body.size))
            order = np.argsort(body.reshape(-1), kind="stable")[:k]
            flat = np.zeros(body.size, dtype=bool)
            flat[order] = True
            mask[1:] = flat.reshape(body.shape)
        else:
            mask[1:] = body < config.threshold
        return mask

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON (atomically: temporary name, then rename)."""
        path = Path(path)
        payload = {"format": "moeca-l2c-router", "version": 1, "beta": self.beta.tolist(),
                   "losses": self.losses.tolist(), "meta": self.meta}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "L2CRouter":
        data = json.loads(Path(path).read_text())
        if data.get("format") != "moeca-l2c-router":
            raise ValueError(f"{path} is not an L2C router file (format {data.get('format')!r})")
        beta = np.asarray(data["beta"], dtype=np.float64)
        if beta.ndim != 3 or beta.shape[2] != len(UNITS):
            raise ValueError(f"{path}: beta must have shape [steps, depth, {len(UNITS)}], got {beta.shape}")
        return cls(beta, np.asarray(data["losses"], dtype=np.float64), data.get("meta", {}))


# ----------------------------------------------------------------------------- training runtimes
class _Recorder(Runtime):
    """Full compute; records each call's block input/condition and every block's attention and MoE output."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._current: dict | None = None

    def begin_forward(self, model, ctx, x_tokens) -> None:
        self._current = {"step": ctx.step if ctx else 0, "branch": ctx.cfg_branch if ctx else "none",
                         "attn": {}, "moe": {}}

    def run_blocks(self, model, x, c):
        self._current["x"], self._current["c"] = x.detach(), c.detach()
        return super().run_blocks(model, x, c)

    def attention(self, block, x_mod):
        out = super().attention(block, x_mod)
        self._current["attn"][block.index] = out.detach()
        return out

    def moe(self, block, h):
        out = super().moe(block, h)
        self._current["moe"][block.index] = out.detach()
        return out

    def end_forward(self, model, ctx) -> None:
        self.calls.append(self._current)
        self._current = None


class _Interpolating(Runtime):
    """Student: unit output = ``beta * fresh + (1 - beta) * cached`` with ``beta [depth, 2]`` (autograd)."""

    def __init__(self, beta: torch.Tensor, cache: dict):
        self.beta, self.cache = beta, cache

    def attention(self, block, x_mod):
        b = self.beta[block.index, 0]
        return b * super().attention(block, x_mod) + (1 - b) * self.cache["attn"][block.index]

    def moe(self, block, h):
        b = self.beta[block.index, 1]
        return b * super().moe(block, h) + (1 - b) * self.cache["moe"][block.index]


def _model_output(model: "DiTMoE", runtime: Runtime, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Blocks + final layer on recorded block inputs: ``x [B,T,D]``, ``c [B,D]`` -> ``[B, T, p*p*C]``."""
    return model.final_layer(runtime.run_blocks(model, x, c), c)


def calibration_labels(num_classes: int, count: int) -> torch.Tensor:
    """``[count]`` labels cycling through the classes."""
    return torch.arange(count) % num_classes


def train_router(model: "DiTMoE", sampler: "SamplerConfig", config: L2CConfig = L2CConfig(),
                 progress: Callable[[int, int], None] | None = None) -> L2CRouter:
    """Train L2C routers on ``config.calibration_samples`` full-compute trajectories of ``model``.

    1. Sample the calibration set with full compute, recording every call's block input ``x [B,T,D]``,
       condition ``c [B,D]`` and each block's attention and MoE outputs.
    2. For every step ``s >= 1`` and CFG context, the cache is the previous step's recorded outputs;
       optimise ``theta[s]`` (``[depth, 2]``) with Adam on
       ``||out(beta) - out_full||^2 / ||out_full||^2 + sparsity * mean(beta)``, summed over the step's calls.
    The model's parameters are frozen during training (their ``requires_grad`` is restored after).
    ``progress(done, total)`` is called after each step.
    """
    from moeca.models.samplers import sample
    S, depth = sampler.num_steps, model.config.depth
    labels = calibration_labels(model.config.num_classes, config.calibration_samples)
    recorder = _Recorder()
    with torch.no_grad(), model.use_runtime(recorder):
        sample(model, sampler, labels, seed=config.calibration_seed)
    by_key: dict[tuple[int, str], dict] = {(c["step"], c["branch"]): c for c in recorder.calls}
    branches = sorted({c["branch"] for c in recorder.calls})
    beta_out = np.ones((S, depth, len(UNITS)))
    losses = np.zeros(S)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for s in range(1, S):
            theta = torch.full((depth, len(UNITS)), config.init_logit, requires_grad=True,
                               device=next(model.parameters()).device)
            opt = torch.optim.Adam([theta], lr=config.lr)
            pairs = [(by_key[(s, b)], by_key[(s - 1, b)]) for b in branches if (s, b) in by_key and (s - 1, b) in by_key]
            with torch.no_grad():
                targets = [_model_output(model, Runtime(), cur["x"], cur["c"]) for cur, _ in pairs]
            loss_value = 0.0
            for _ in range(config.iterations):
                opt.zero_grad()
                beta = torch.sigmoid(theta)
                err = 0.0
                for (cur, prev), target in zip(pairs, targets):
                    out = _model_output(model, _Interpolating(beta, prev), cur["x"], cur["c"])
                    err = err + (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
                loss = err + config.sparsity * beta.mean()
                loss.backward()
                opt.step()
                loss_value = float(err.detach())
            beta_out[s] = torch.sigmoid(theta).detach().cpu().double().numpy()
            losses[s] = loss_value
            if progress:
                progress(s, S - 1)
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
    meta = {"training": config.training_key(), "num_steps": S, "depth": depth, "sampler": sampler.to_dict(),
            "model": model.config.fingerprint()}
    return L2CRouter(beta_out, losses, meta)


def build_schedule(router: L2CRouter, config: L2CConfig, model_config, sampler_cfg,
                   weights_hash: str | None = None):
    """Export trained routers as a static schedule: a reused (step, block, unit) is ``never`` (attention
    output or whole MoE output from the last step it was computed), the rest ``always``.
    -> :class:`moeca.policy.schedule.Schedule`."""
    from moeca.policy.schedule import ALWAYS, NEVER, StepRule
    from .common import assemble, block_rule
    S, depth, E = sampler_cfg.num_steps, model_config.depth, model_config.num_experts
    if router.beta.shape != (S, depth, len(UNITS)):
        raise ValueError(f"l2c router has shape {router.beta.shape} but the model/sampler need "
                         f"({S}, {depth}, {len(UNITS)}); retrain it for this model and step count")
    mask = router.reuse_mask(config)
    steps = [StepRule("compute", tuple(block_rule(E, attn=NEVER if mask[s, b, 0] else ALWAYS,
                                                  moe=NEVER if mask[s, b, 1] else ALWAYS) for b in range(depth)))
             for s in range(S)]
    sync = [s for s in range(S) if not mask[s].any()]
    return assemble("l2c", model_config, sampler_cfg, steps, sync=sync, weights_hash=weights_hash,
                    provenance={"baseline": "l2c", "config": config.to_dict(), "router": router.meta,
                                "reused_decisions": int(mask.sum())})
