"""ToCa: token-wise feature caching (the authors' DiT DDIM-50 recipe by default).

Published method (Zou et al., "Accelerating Diffusion Transformers with Token-wise Feature Caching",
ICLR 2025; public code DiT-ToCa). The sampler's step ``r`` counts *down* from ``S - 1``. A full step
computes every token; the steps in between recompute, per layer and module, only a fraction of the
tokens and reuse the cached outputs of the others.

- Full steps: the first step, and every step with ``r % I == 0``, where the interval ``I`` is fixed at
  each full step (the force scheduler, run at layer 0 of a full step; the layers and steps after it
  re-check against it): ``I = round(fresh_threshold / (1 + 0.4 - 0.8 r / S))``, forced to 2 while ``r``
  is in 50..99 (the DDPM-250 recipe's sensitive window; never reached at 50 steps).
- Fresh ratio on the other steps (ratio scheduler): ``fresh_ratio * layer * step * module`` with
  ``step = 1 + w_s - 2 w_s r / S``, ``layer = 1 + w_l - 2 w_l l / (depth - 1)``, module factor
  ``1 + 0.6 * 2.5 = 2.5`` for the MLP and ``1 - 0.4 * 2.5 = 0`` for attention (attention fully reused);
  ``ToCa-ddim50``: ``w_s = 2.0, w_l = -0.2``; ``ToCa-ddpm250``: ``w_s = 0.4, w_l = 0.8``. A negative
  ratio recomputes nothing, a ratio above 1 everything; ``int(ratio * T)`` tokens per sample.
- Which tokens: per sample the highest scores of s1 (attention score, the authors' ``cache_type
  attention``) + ``soft_fresh_weight * age / fresh_threshold`` (s3) + the s4 spatial bonus (``+0.6 x`` for
  the best token of every 2x2 patch).

Authors' DDIM-50 command: ``--fresh-threshold 3 --fresh-ratio 0.07 --ratio-scheduler ToCa-ddim50
--force-fresh global --soft-fresh-weight 0.25``; these are the defaults.

Here the MLP is the whole MoE update (router, routed experts and shared expert) of a token. s1 (the
authors' ``--cache-type attention``) needs the attention map, which SDPA does not expose; the score used is
DiT-ToCa's published map-free option ``--cache-type similarity``: per sample ``normalize_L2(1 - cos(x,
c))`` over the tokens, ``x`` the module's current input and ``c`` its cached output, plus s3 and s4 as
published. It runs in the replay engine's ToCa selection hook (:mod:`moeca.replay.units.selection`, the one
home of ToCa's scoring), named by the schedule's ``token_selection``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from moeca.policy.schedule import Rule, Schedule, ScoreConfig, StepRule, TokenSelection

from .common import Context, assemble, block_rule, full_blocks

SUMMARY = "ToCa: token-wise caching, a scheduled fraction of tokens recomputed per layer between full steps"

RATIO_SCHEDULERS = {"ToCa-ddim50": (2.0, -0.2), "ToCa-ddpm250": (0.4, 0.8)}
"""The published ratio schedulers: ``(step_weight, layer_weight)``."""
MODULE_WEIGHT = 2.5
MODULE_TIME_WEIGHT = 0.6
FORCE_STEP_WEIGHT = 0.4
"""The force scheduler's linear step weight (published 0.4 when ``fresh_ratio > 0``, 0 for FORA)."""
SENSITIVE_STEPS = range(50, 100)
"""Countdown steps where the published force scheduler sets the interval to 2."""


@dataclass(frozen=True)
class Config:
    """Knobs of ToCa (defaults: the authors' DiT DDIM-50 command).

    fresh_threshold: the base refresh interval ``N`` in steps (published 3 at DDIM-50, 4 at DDPM-250);
        ``1`` refreshes every step (no reuse).
    fresh_ratio: base fraction of tokens recomputed between full steps (published 0.07), scaled by the
        ratio scheduler's factors.
    ratio_scheduler: ``ToCa-ddim50`` or ``ToCa-ddpm250`` (:data:`RATIO_SCHEDULERS`).
    soft_fresh_weight: weight of the staleness score s3 (published 0.25).
    spatial_bonus: s4 bonus ratio of the best token of each ``spatial_grid`` x ``spatial_grid`` patch
        (published 0.6 and 2); 0 disables it.
    spatial_grid: side of the s4 patch in tokens (published 2).
    """

    fresh_threshold: int = 3
    fresh_ratio: float = 0.07
    ratio_scheduler: str = "ToCa-ddim50"
    soft_fresh_weight: float = 0.25
    spatial_bonus: float = 0.6
    spatial_grid: int = 2

    def __post_init__(self) -> None:
        for name in ("fresh_threshold", "spatial_grid"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"toca {name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= self.fresh_ratio <= 1.0:
            raise ValueError(f"toca fresh_ratio must be in [0, 1], got {self.fresh_ratio}")
        if self.ratio_scheduler not in RATIO_SCHEDULERS:
            raise ValueError(f"toca ratio_scheduler must be one of {', '.join(RATIO_SCHEDULERS)}, got "
                             f"{self.ratio_scheduler!r}")
        for name in ("soft_fresh_weight", "spatial_bonus"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"toca {name} must be a finite number >= 0, got {v}")


def interval_at(config: Config, step: int, num_steps: int) -> int:
    """The force scheduler's refresh interval set at a full ``step`` (``s``, 0 = noisiest), >= 1."""
    r = num_steps - 1 - step
    if config.fresh_ratio > 0 and r in SENSITIVE_STEPS:
        return 2
    w = FORCE_STEP_WEIGHT if config.fresh_ratio > 0 else 0.0
    return max(1, int(round(config.fresh_threshold / (1 + w - 2 * w * r / num_steps))))


def refresh_steps(config: Config, num_steps: int) -> list[int]:
    """Full steps: step 0, then every step whose countdown ``r`` is a multiple of the interval fixed at
    the last full step."""
    out, interval = [], config.fresh_threshold
    for s in range(num_steps):
        if s == 0 or (num_steps - 1 - s) % interval == 0:
            out.append(s)
            interval = interval_at(config, s, num_steps)
    return out


def fresh_ratio(config: Config, step: int, num_steps: int, block: int, depth: int, module: str) -> float:
    """The ratio scheduler's fraction of tokens recomputed at a cached ``step`` in ``block`` for ``module``
    (``attn`` or ``mlp``), clipped to [0, 1]."""
    w_s, w_l = RATIO_SCHEDULERS[config.ratio_scheduler]
    r = num_steps - 1 - step
    step_f = 1 + w_s - 2 * w_s * r / num_steps
    layer_f = 1 + w_l - 2 * w_l * block / max(depth - 1, 1)
    module_f = 1 - (1 - MODULE_TIME_WEIGHT) * MODULE_WEIGHT if module == "attn" else 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT
    return min(max(config.fresh_ratio * layer_f * step_f * module_f, 0.0), 1.0)


def build(config: Config, context: Context) -> Schedule:
    """Full steps are sync steps; on the others attention and the whole MoE output are ``fraction
    int(ratio * T) / T`` per block (attention's ratio is 0 with the published module factors); the
    schedule's ``token_selection`` (kind ``toca``) makes the engine pick ToCa's tokens per sample."""
    mc, sampler = context.model_config, context.sampler_cfg
    S, depth, E, T = sampler.num_steps, mc.depth, mc.num_experts, mc.num_tokens
    sync = refresh_steps(config, S)
    steps = []
    for s in range(S):
        if s in sync:
            steps.append(StepRule("compute", full_blocks(depth, E)))
            continue
        steps.append(StepRule("compute", tuple(
            block_rule(E, attn=Rule.fraction(int(fresh_ratio(config, s, S, b, depth, "attn") * T) / T),
                       moe=Rule.fraction(int(fresh_ratio(config, s, S, b, depth, "mlp") * T) / T))
            for b in range(depth))))
    score = ScoreConfig(drift_weight=1.0, staleness_weight=config.soft_fresh_weight / config.fresh_threshold)
    schedule = assemble("toca", mc, sampler, steps, sync=sync, scores={"attn": score, "moe": score},
                        weights_hash=context.weights_hash,
                        provenance={"method": "toca", "config": {k: getattr(config, k) for k in config.__dataclass_fields__}})
    return replace(schedule, token_selection=TokenSelection(
        "toca", soft_fresh_weight=config.soft_fresh_weight, fresh_threshold=config.fresh_threshold,
        spatial_bonus=config.spatial_bonus, spatial_grid=config.spatial_grid))
