"""ToCa baseline: token-wise feature caching.

Original method (Zou et al., "Accelerating Diffusion Transformers with Token-wise Feature Caching",
ICLR 2025; public code DiT-ToCa): a full refresh runs every few steps; on the steps in between each
layer recomputes only a *fraction* of its tokens and reuses the cached outputs of the others. Tokens are
chosen by a score: an attention-map score (s1), a cache-frequency score (s3: tokens reused for many
steps get a bonus, weight ``soft_fresh_weight`` times staleness over the refresh threshold) and a
spatial-uniformity bonus (s4: the best token of every 2x2 patch gets ``+0.6 x`` its score). The
published DiT schedule ("ToCa" ratio scheduler) computes *no* attention on cached steps (the module
factor for attention is ``1 - 0.4 * 2.5 = 0``) and moves that budget to the MLP (factor
``1 + 0.6 * 2.5 = 2.5``), fresh ratios shrink from the first to the last layer (layer weight 0.8) and
grow from the first to the last step (step weight 0.4); the refresh interval ``round(N / step_factor)``
shortens towards the end and is 2 in the sensitive window (countdown steps 50-99 of 250, i.e. 20-40%
of the trajectory before the end). Published DiT defaults: ``fresh_threshold=4``,
``fresh_ratio=0.07``, ``soft_fresh_weight=0.25``, ``force_fresh=global``.

Here the MLP is the whole MoE update (router, routed experts and shared expert) of a token; the
attention map is hidden by SDPA, so s1 is replaced by ToCa's own "similarity" option: 1 - cosine of
the token's current MoE input against its input when last computed (L2-normalised over the tokens of
a sample). s3 and s4 are as published.

This module holds the knobs, the per-step plan (:func:`plan`) and the token score (:func:`token_scores`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TocaConfig:
    """Knobs of ToCa (defaults: the published DiT settings).

    fresh_threshold: ``N``, the base refresh interval in steps (published 4). The interval at a step is
        ``round(N / step_factor)`` (at least 1); ``N = 1`` refreshes every step (no reuse).
    fresh_ratio: base fraction of tokens recomputed on cached steps (published 0.07); multiplied by the
        layer, step and module factors below, clipped to [0, 1].
    step_weight: step factor ``1 + w - 2 w r / S`` with ``r`` the countdown step (published 0.4).
    layer_weight: layer factor ``1 + w - 2 w l / (depth - 1)`` (published 0.8).
    module_weight, module_time_weight: module factors; MoE ``1 + mtw * mw`` (= 2.5), attention
        ``1 - (1 - mtw) * mw`` (= 0: attention fully reused on cached steps). Published 2.5 and 0.6.
    soft_fresh_weight: weight of the staleness score s3 (published 0.25).
    spatial_bonus: s4 bonus ratio for the best token of each ``spatial_grid`` x ``spatial_grid`` patch
        (published 0.6 and 2); 0 disables it (it needs a square token grid divisible by the patch).
    sensitive_window: fraction ``(lo, hi)`` of the countdown ``r / S`` where the refresh interval is
        forced to ``sensitive_interval`` (published: countdown steps 50-99 of 250 -> (0.2, 0.4), 2).
        ``()`` disables it.
    """

    fresh_threshold: int = 4
    fresh_ratio: float = 0.07
    step_weight: float = 0.4
    layer_weight: float = 0.8
    module_weight: float = 2.5
    module_time_weight: float = 0.6
    soft_fresh_weight: float = 0.25
    spatial_bonus: float = 0.6
    spatial_grid: int = 2
    sensitive_window: tuple[float, ...] = (0.2, 0.4)
    sensitive_interval: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.fresh_threshold, int) or self.fresh_threshold < 1:
            raise ValueError(f"toca fresh_threshold must be an integer >= 1, got {self.fresh_threshold!r}")
        if not 0.0 <= self.fresh_ratio <= 1.0:
            raise ValueError(f"toca fresh_ratio must be in [0, 1], got {self.fresh_ratio}")
        for name in ("step_weight", "layer_weight", "module_weight", "module_time_weight", "soft_fresh_weight",
                     "spatial_bonus"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"toca {name} must be a finite number >= 0, got {value}")
        if self.spatial_grid < 1:
            raise ValueError(f"toca spatial_grid must be >= 1, got {self.spatial_grid}")
        if self.sensitive_window and (len(self.sensitive_window) != 2
                                      or not 0 <= self.sensitive_window[0] <= self.sensitive_window[1] <= 1):
            raise ValueError(f"toca sensitive_window must be () or (lo, hi) with 0 <= lo <= hi <= 1, got "
                             f"{self.sensitive_window}")
        if self.sensitive_interval < 1:
            raise ValueError(f"toca sensitive_interval must be >= 1, got {self.sensitive_interval}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    # ------------------------------------------------------------------ schedule factors
    def step_factor(self, step: int, num_steps: int) -> float:
        r = num_steps - 1 - step  # ToCa counts down
        return 1 + self.step_weight - 2 * self.step_weight * r / num_steps

    def interval(self, step: int, num_steps: int) -> int:
        """Refresh interval in force at ``step`` (>= 1)."""
        if self.fresh_threshold == 1:
            return 1
        r = num_steps - 1 - step
        if self.sensitive_window and self.fresh_ratio > 0 and self.fresh_threshold > 1:
            lo, hi = self.sensitive_window
            if lo * num_steps <= r < hi * num_steps:
                return self.sensitive_interval
        return max(1, int(round(self.fresh_threshold / self.step_factor(step, num_steps))))

    def is_refresh(self, step: int, num_steps: int) -> bool:
        """Full refresh at ``step``: the first step, or countdown ``r`` divisible by the interval."""
        r = num_steps - 1 - step
        return step == 0 or r % self.interval(step, num_steps) == 0

    def moe_fresh_ratio(self, step: int, num_steps: int, block: int, depth: int) -> float:
        """Fraction of tokens whose MoE update is recomputed at a cached ``step`` in ``block``."""
        layer = 1 + self.layer_weight - 2 * self.layer_weight * block / max(depth - 1, 1)
        module = 1 + self.module_time_weight * self.module_weight
        return min(max(self.fresh_ratio * layer * self.step_factor(step, num_steps) * module, 0.0), 1.0)

    def attention_fresh_ratio(self, step: int, num_steps: int, block: int, depth: int) -> float:
        """Fraction of tokens whose attention is recomputed at a cached step (0 with the published factors)."""
        layer = 1 + self.layer_weight - 2 * self.layer_weight * block / max(depth - 1, 1)
        module = 1 - (1 - self.module_time_weight) * self.module_weight
        return min(max(self.fresh_ratio * layer * self.step_factor(step, num_steps) * module, 0.0), 1.0)


@dataclass(frozen=True)
class TocaStepPlan:
    """What ToCa does at one step: ``refresh`` (all computed) or per-block MoE fresh token counts."""

    step: int
    refresh: bool
    moe_fresh_tokens: tuple[int, ...]  # per block, tokens per sample recomputed (== T on refresh steps)
    attention_fresh_tokens: tuple[int, ...]


def plan(config: TocaConfig, num_steps: int, depth: int, num_tokens: int) -> list[TocaStepPlan]:
    """The full per-step plan. Token counts are ``int(ratio * T)`` per sample, as in ToCa."""
    out = []
    for s in range(num_steps):
        if config.is_refresh(s, num_steps):
            out.append(TocaStepPlan(s, True, (num_tokens,) * depth, (num_tokens,) * depth))
            continue
        moe = tuple(int(config.moe_fresh_ratio(s, num_steps, b, depth) * num_tokens) for b in range(depth))
        att = tuple(int(config.attention_fresh_ratio(s, num_steps, b, depth) * num_tokens) for b in range(depth))
        out.append(TocaStepPlan(s, False, moe, att))
    return out


def token_scores(config: TocaConfig, h: torch.Tensor, h_cached: torch.Tensor, staleness: torch.Tensor,
                 grid: int | None = None) -> torch.Tensor:
    """ToCa's token score ``[B, T]`` (higher = recompute first).

    h: current MoE input ``[B, T, D]``; h_cached: the input when each token was last computed
    ``[B, T, D]``; staleness: steps since each token was last computed ``[B, T]``; grid: side of the
    square token grid for the spatial bonus (``None`` = ``sqrt(T)`` when square, else no bonus).
    Score = ``normalize_L2(1 - cos(h, h_cached))`` + ``soft_fresh_weight * staleness / fresh_threshold``,
    then the s4 spatial bonus.
    """
    cos = F.cosine_similarity(h.float(), h_cached.float(), dim=-1)
    score = F.normalize(1 - cos, dim=-1, p=2)
    score = score + config.soft_fresh_weight * staleness.float() / config.fresh_threshold
    return spatial_bonus(score, config.spatial_bonus, config.spatial_grid, grid)


def spatial_bonus(score: torch.Tensor, bonus: float, patch: int, grid: int | None = None) -> torch.Tensor:
    """ToCa's s4: in every ``patch x patch`` group of the token grid the best token gets ``+bonus x`` its score.

    score ``[B, T]`` -> ``[B, T]``. Returns ``score`` unchanged when ``bonus == 0`` or the grid does not
    tile (non-square T, or side not divisible by ``patch``).
    """
    B, T = score.shape
    side = grid if grid is not None else int(round(math.sqrt(T)))
    if bonus == 0 or patch <= 1 or side * side != T or side % patch:
        return score
    g = side // patch
    blocks = score.view(B, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(B, g * g, patch * patch)
    best, idx = blocks.max(dim=-1, keepdim=True)
    blocks = blocks + torch.zeros_like(blocks).scatter_(-1, idx, 1.0) * best * bonus
    return blocks.view(B, g, g, patch, patch).permute(0, 1, 3, 2, 4).reshape(B, T)


def select_tokens(score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices ``[B, count]`` of the ``count`` highest-scoring tokens of each sample."""
    if not 0 <= count <= score.shape[1]:
        raise ValueError(f"toca: cannot select {count} of {score.shape[1]} tokens")
    return score.argsort(dim=-1, descending=True)[:, :count]


def build_schedule(config: TocaConfig, model_config, sampler_cfg, weights_hash: str | None = None):
    """The ToCa schedule. Refresh steps are sync steps; on the others attention follows the attention
    fresh ratio (0 = ``never`` with the published factors) and the whole MoE output follows
    ``fraction int(ratio * T) / T`` per block. The ``moe`` score is drift + ``soft_fresh_weight /
    fresh_threshold`` x staleness; the schedule's ``token_selection`` (kind ``toca``) makes the replay
    engine apply ToCa's exact selection (per-sample normalised score, s4 bonus, per-sample top-k).
    -> :class:`moeca.policy.schedule.Schedule`."""
    from dataclasses import replace
    from moeca.policy.schedule import Rule, ScoreConfig, StepRule, TokenSelection
    from .common import assemble, block_rule, full_blocks
    S, depth, E, T = sampler_cfg.num_steps, model_config.depth, model_config.num_experts, model_config.num_tokens
    steps, sync = [], []
    for p in plan(config, S, depth, T):
        if p.refresh:
            sync.append(p.step)
            steps.append(StepRule("compute", full_blocks(depth, E)))
            continue
        steps.append(StepRule("compute", tuple(
            block_rule(E, attn=Rule.fraction(p.attention_fresh_tokens[b] / T), moe=Rule.fraction(p.moe_fresh_tokens[b] / T))
            for b in range(depth))))
    score = ScoreConfig(drift_weight=1.0, staleness_weight=config.soft_fresh_weight / config.fresh_threshold)
    schedule = assemble("toca", model_config, sampler_cfg, steps, sync=sync, scores={"attn": score, "moe": score},
                        weights_hash=weights_hash, provenance={"baseline": "toca", "config": config.to_dict()})
    return replace(schedule, token_selection=TokenSelection(
        "toca", soft_fresh_weight=config.soft_fresh_weight, fresh_threshold=config.fresh_threshold,
        spatial_bonus=config.spatial_bonus, spatial_grid=config.spatial_grid))

