"""MagCache's magnitude-ratio curve, measured on full-compute runs (engine-side: it runs the model).

``mag_ratios[i]`` = mean over tokens (and samples and CFG rows) of ``||r_i|| / ||r_{i-1}||`` with ``r_i``
the residual of all transformer blocks (output minus input, ``[B, T, D]``, norms over ``D``) at step ``i``;
``mag_ratios[0] = 1`` (diffusers' calibration, ``MagCacheConfig(calibrate=True)``). With several
calibration seeds the curves are averaged. The policy unit :mod:`moeca.policy.methods.magcache` takes the
curve as its ``mag_ratios`` knob.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from moeca.diffusion.samplers import sample
from moeca.models.runtime import Runtime

if TYPE_CHECKING:  # pragma: no cover
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.models.dit_moe import DiTMoE

EPS = 1e-8


class _ResidualRatios(Runtime):
    """Computes everything; per CFG context records ``mean ||r_s|| / ||r_{s-1}||`` at every step."""

    def __init__(self) -> None:
        self.ratios: dict[tuple[str, int], float] = {}
        self._prev: dict[str, torch.Tensor] = {}
        self._key: tuple[str, int] = ("none", 0)

    def begin_forward(self, model, ctx, x_tokens) -> None:
        self._key = (ctx.cfg_branch, ctx.step) if ctx is not None else ("none", 0)

    def run_blocks(self, model, x, c):
        out = super().run_blocks(model, x, c)
        norm = (out - x).float().norm(dim=-1)                      # [B, T]
        branch, step = self._key
        prev = self._prev.get(branch)
        self.ratios[self._key] = 1.0 if prev is None or prev.shape != norm.shape or step == 0 \
            else float((norm / (prev + EPS)).mean())
        self._prev[branch] = norm
        return out


@torch.no_grad()
def fit_mag_ratios(model: "DiTMoE", sampler: "SamplerConfig", labels: torch.Tensor,
                   seeds: Sequence[int] = (0,)) -> tuple[float, ...]:
    """The per-step magnitude ratios ``[S]`` of ``model`` under ``sampler`` on full-compute samples of
    ``labels [B]`` (one run per seed, CFG contexts and seeds averaged)."""
    per_seed = []
    for seed in seeds:
        rec = _ResidualRatios()
        with model.use_runtime(rec):
            sample(model, sampler, labels, seed=seed)
        steps = sorted({s for _, s in rec.ratios})
        per_seed.append([np.mean([v for (b, s), v in rec.ratios.items() if s == step]) for step in steps])
    curve = np.mean(np.asarray(per_seed), axis=0)
    curve[0] = 1.0
    return tuple(float(v) for v in curve)
