"""Carry a schedule's reuse pattern over to another model shape (same step count and sampler).

Used for shape studies: e.g. the rules derived on the demo model applied to S/2-8E2A with random
weights, so both run with the same reuse fractions. Block ``b`` of the target takes the rules of
source block ``floor(b * depth_src / depth_dst)``; expert ``e`` those of source expert
``e mod num_experts_src``. Sync steps, scores and the whole-model rule are kept; the predicted
FLOPs ratio is dropped (replay measures it).
"""
from __future__ import annotations

from dataclasses import replace

from .schedule import BlockRule, ModelIdentity, Schedule, StepRule


def retarget(schedule: Schedule, config, weights_hash: str | None = None) -> Schedule:
    """The same per-step reuse pattern for the model ``config`` (a ``DiTMoEConfig``)."""
    src_depth, src_e = schedule.model.depth, schedule.model.num_experts
    steps = []
    for step in schedule.steps:
        blocks = []
        for b in range(config.depth):
            r = step.blocks[b * src_depth // config.depth]
            blocks.append(BlockRule(r.attn, r.moe, r.shared,
                                    tuple(r.experts[e % src_e] for e in range(config.num_experts))))
        steps.append(StepRule(step.model, tuple(blocks)))
    # the FLOPs prediction depended on the source model's cost mix and routing persistence: drop it
    return replace(schedule, model=ModelIdentity.of(config, weights_hash), steps=tuple(steps),
                   predicted_flops_ratio=None,
                   provenance={**schedule.provenance, "retargeted_from": schedule.model.name})


def resample_steps(schedule: Schedule, num_steps: int) -> Schedule:
    """The same reuse pattern over ``num_steps`` steps (shape studies with fewer steps).

    Keeps the share of sync steps (at least the first and the last step, the rest evenly spaced); a
    non-sync target step ``s`` takes the rules of the non-sync source step nearest to
    ``s * (S - 1) / (num_steps - 1)``. The predicted FLOPs ratio is dropped (replay measures it).
    """
    S = schedule.num_steps
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    n_sync = min(num_steps, max(2, round(len(schedule.sync_refresh_steps) / S * num_steps)))
    sync = sorted({round(x * (num_steps - 1) / (n_sync - 1)) for x in range(n_sync)})
    plain = [j for j in range(S) if not schedule.is_sync(j)] or list(range(S))
    steps = []
    for s in range(num_steps):
        pos = s * (S - 1) / (num_steps - 1)
        steps.append(schedule.steps[min(plain, key=lambda j: abs(j - pos))])
    sampler = replace(schedule.sampler, num_steps=num_steps)
    return replace(schedule, sampler=sampler, steps=tuple(steps), sync_refresh_steps=tuple(sync),
                   predicted_flops_ratio=None, provenance={**schedule.provenance, "resampled_from_steps": S})
