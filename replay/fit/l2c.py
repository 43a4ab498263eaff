"""Learning-to-Cache router training (engine-side: it runs the model).

Trains the per-(step, block, unit) router values ``beta`` of :mod:`moeca.policy.methods.l2c` on
full-compute calibration trajectories and returns an :class:`~moeca.policy.methods.l2c.L2CRouter` (save it,
then export with ``moeca schedule build l2c --set router=PATH``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from moeca.diffusion.samplers import sample
from moeca.models.runtime import Runtime
from moeca.policy.methods.l2c import UNITS, L2CRouter, candidate_steps

if TYPE_CHECKING:  # pragma: no cover
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.models.dit_moe import DiTMoE


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of L2C router training.

    sparsity: ``lambda``, weight of the mean router value in the loss (the output error term is the
        relative MSE ``||out - out_full||^2 / ||out_full||^2`` of the model output at the step). Larger
        values push more layers towards reuse.
    max_iterations: cap on Adam iterations per step (each step's routers only affect that step's loss, so
        steps are trained one after another on their own calibration inputs). Training of a step stops
        earlier once its loss has converged (see ``tolerance``).
    batch_samples: calibration samples per iteration (minibatches cycle through the calibration set;
        ``None`` = all of them every iteration).
    tolerance, window: convergence test, as the paper trains "until the loss converges": a step stops
        when the mean loss of its last ``window`` iterations is at most ``tolerance`` (relative) below the
        mean of the ``window`` iterations before (:func:`converged`). ``tolerance = 0`` always runs
        ``max_iterations``.
    lr: Adam learning rate on the router logits.
    init_logit: initial ``theta`` (sigmoid 3.0 = 0.95: start close to full compute).
    calibration_samples: number of calibration samples (labels cycle through the classes).
    calibration_seed: seed of the calibration noise (keep it apart from evaluation seeds).
    alternating: train only the candidate steps of the published alternating structure (odd steps, the
        cache from the full step before; :func:`moeca.policy.methods.l2c.candidate_steps`); the other steps
        keep ``beta = 1``. False trains every step after the first.
    """

    sparsity: float = 0.02
    max_iterations: int = 200
    batch_samples: int | None = 4
    tolerance: float = 1e-2
    window: int = 5
    lr: float = 0.3
    init_logit: float = 3.0
    calibration_samples: int = 16
    calibration_seed: int = 1000
    alternating: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.sparsity) or self.sparsity < 0:
            raise ValueError(f"l2c sparsity must be a finite number >= 0, got {self.sparsity}")
        if self.max_iterations < 0 or self.calibration_samples < 1 or self.window < 1:
            raise ValueError(f"l2c max_iterations must be >= 0, calibration_samples >= 1 and window >= 1, got "
                             f"{self.max_iterations}, {self.calibration_samples}, {self.window}")
        if self.batch_samples is not None and not 1 <= self.batch_samples <= self.calibration_samples:
            raise ValueError(f"l2c batch_samples must be in 1..calibration_samples ({self.calibration_samples}) or "
                             f"None, got {self.batch_samples}")
        if not math.isfinite(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"l2c tolerance must be a finite number >= 0, got {self.tolerance}")

    def training_key(self) -> dict:
        """Every knob (they all change the trained routers), for cache keys and the router's meta."""
        return {"sparsity": self.sparsity, "max_iterations": self.max_iterations,
                "batch_samples": self.batch_samples, "tolerance": self.tolerance, "window": self.window,
                "lr": self.lr, "init_logit": self.init_logit, "calibration_samples": self.calibration_samples,
                "calibration_seed": self.calibration_seed, "alternating": self.alternating}


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


def train_router(model: "DiTMoE", sampler: "SamplerConfig", config: TrainConfig = TrainConfig(),
                 progress: Callable[[int, int], None] | None = None, weights_hash: str | None = None) -> L2CRouter:
    """Train L2C routers on ``config.calibration_samples`` full-compute trajectories of ``model``.

    1. Sample the calibration set with full compute, recording every call's block input ``x [B,T,D]``,
       condition ``c [B,D]`` and each block's attention and MoE outputs.
    2. For every step ``s >= 1`` and CFG context, the cache is the previous step's recorded outputs;
       optimise ``theta[s]`` (``[depth, 2]``) with Adam on
       ``||out(beta) - out_full||^2 / ||out_full||^2 + sparsity * mean(beta)``, summed over the step's
       calls, on minibatches of ``batch_samples`` calibration samples (cycling), until the loss
       converges (:class:`TrainConfig` ``tolerance`` / ``window``) or ``max_iterations``. Only the
       candidate steps are trained (``alternating``: the odd steps); the others keep ``beta = 1``. Every
       iteration's loss is kept (the router's ``curves``).
    The model's parameters are frozen during training (their ``requires_grad`` is restored after).
    ``progress(done, total)`` is called after each step. ``weights_hash`` is recorded in the meta.
    """
    S, depth = sampler.num_steps, model.config.depth
    labels = calibration_labels(model.config.num_classes, config.calibration_samples)
    recorder = _Recorder()
    with torch.no_grad(), model.use_runtime(recorder):
        sample(model, sampler, labels, seed=config.calibration_seed)
    by_key: dict[tuple[int, str], dict] = {(c["step"], c["branch"]): c for c in recorder.calls}
    n = config.calibration_samples
    per = config.batch_samples or n
    batches = [torch.arange(i, min(i + per, n)) for i in range(0, n, per)]
    branches = sorted({c["branch"] for c in recorder.calls})
    beta_out = np.ones((S, depth, len(UNITS)))
    losses = np.zeros(S)
    curves: list[tuple[float, ...]] = [()]
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        candidates = set(candidate_steps(S, config.alternating))
        for s in range(1, S):
            if s not in candidates:
                curves.append(())
                if progress:
                    progress(s, S - 1)
                continue
            theta = torch.full((depth, len(UNITS)), config.init_logit, requires_grad=True,
                               device=next(model.parameters()).device)
            opt = torch.optim.Adam([theta], lr=config.lr)
            pairs = [(by_key[(s, b)], by_key[(s - 1, b)]) for b in branches if (s, b) in by_key and (s - 1, b) in by_key]
            with torch.no_grad():
                targets = [_model_output(model, Runtime(), cur["x"], cur["c"]) for cur, _ in pairs]
            curve: list[float] = []
            err_value = 0.0
            for it in range(config.max_iterations):
                opt.zero_grad()
                beta = torch.sigmoid(theta)
                err = 0.0
                idx = batches[it % len(batches)]
                for (cur, prev), target in zip(pairs, targets):
                    rows = _rows(idx, cur["x"].shape[0], n)
                    out = _model_output(model, _Interpolating(beta, _take(prev, rows)), cur["x"][rows], cur["c"][rows])
                    t = target[rows]
                    err = err + (out - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
                loss = err + config.sparsity * beta.mean()
                loss.backward()
                opt.step()
                curve.append(float(loss.detach()))
                err_value = float(err.detach())
                if converged(curve, config.tolerance, config.window):
                    break
            beta_out[s] = torch.sigmoid(theta).detach().cpu().double().numpy()
            losses[s] = err_value
            curves.append(tuple(curve))
            if progress:
                progress(s, S - 1)
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
    iters = [len(c) for c in curves[1:] if c]
    meta = {"training": config.training_key(), "num_steps": S, "depth": depth, "sampler": sampler.to_dict(),
            "model": model.config.fingerprint(), "weights_hash": weights_hash,
            "iterations": {"min": min(iters, default=0), "max": max(iters, default=0), "total": sum(iters)},
            "trained_steps": len(iters),
            "converged_steps": sum(converged(list(c), config.tolerance, config.window) for c in curves[1:] if c)}
    return L2CRouter(beta_out, losses, meta, tuple(curves))


def converged(curve: Sequence[float], tolerance: float, window: int) -> bool:
    """Whether a loss ``curve`` has converged: the mean of its last ``window`` values is at most
    ``tolerance`` (relative) below the mean of the ``window`` values before them (means over a window
    that spans the minibatches smooth their noise). ``tolerance = 0`` never converges early."""
    if tolerance <= 0 or len(curve) < 2 * window:
        return False
    before = sum(curve[-2 * window:-window]) / window
    return before - sum(curve[-window:]) / window <= tolerance * abs(before)


def _rows(idx: torch.Tensor, rows: int, samples: int) -> torch.Tensor:
    """Row indices of calibration samples ``idx`` in a recorded call of ``rows`` rows: ``samples`` rows
    (one CFG branch) or ``2 * samples`` (batched CFG, ``[cond; uncond]``)."""
    return idx if rows == samples else torch.cat([idx, idx + samples])


def _take(call: dict, rows: torch.Tensor) -> dict:
    """The recorded attention / MoE outputs of ``call`` restricted to ``rows``."""
    return {unit: {b: t[rows] for b, t in call[unit].items()} for unit in UNITS}
