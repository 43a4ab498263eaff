"""First-Block Cache (FBCache), with DBCache's first/last-``n`` generalisation.

As diffusers defines it (``FirstBlockCacheConfig`` / ``hooks/first_block_cache.py``, after ParaAttention's
FBCache): every forward runs the first transformer block and takes its residual ``r`` (output minus
input); against the residual ``r_prev`` stored at the last forward that ran every block it computes
``d = mean|r - r_prev| / mean|r_prev|``; if ``d < threshold`` (diffusers computes when ``d > threshold``)
the remaining blocks are skipped and their residual cached at that forward is added to the first block's
output, else they run and both residuals are stored. diffusers' default threshold is 0.05. cache-dit's
DBCache generalises the head to the first ``Fn`` blocks (the residual compared is theirs) and always runs
the last ``Bn`` blocks on top of the cached middle (``F1B0`` is FBCache; its default is ``F8B0``).

The rule is the schedule format's whole-model skip with indicator ``first_blocks_residual``
(:class:`~moeca.policy.schedule.ModelSkip`), run by the replay engine (:mod:`moeca.replay.units.model_skip`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from moeca.policy.schedule import ModelSkip, Schedule, StepRule

from .common import Context, assemble, full_blocks

SUMMARY = "First-Block Cache / DBCache: skip the middle blocks while the first blocks' residual barely changed"


@dataclass(frozen=True)
class Config:
    """Knobs of First-Block Cache (defaults: diffusers' ``FirstBlockCacheConfig``, ``F1B0``).

    threshold: skip the middle blocks while the first blocks' relative residual change is below this
        value (dimensionless; diffusers 0.05; 0 computes every step).
    first_blocks: ``Fn``, blocks always run whose residual is compared (1 = FBCache).
    last_blocks: ``Bn``, blocks always run after the cached middle (0 = FBCache).
    """

    threshold: float = 0.05
    first_blocks: int = 1
    last_blocks: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"fbcache threshold must be a finite number >= 0, got {self.threshold}")
        if not isinstance(self.first_blocks, int) or self.first_blocks < 1:
            raise ValueError(f"fbcache first_blocks must be an integer >= 1, got {self.first_blocks!r}")
        if not isinstance(self.last_blocks, int) or self.last_blocks < 0:
            raise ValueError(f"fbcache last_blocks must be an integer >= 0, got {self.last_blocks!r}")


def build(config: Config, context: Context) -> Schedule:
    """Step 0 ``compute``, the others ``adaptive`` under a ``first_blocks_residual`` :class:`ModelSkip`.
    The predicted FLOPs ratio is None (the skips are decided at run time)."""
    mc, sampler = context.model_config, context.sampler_cfg
    if config.first_blocks + config.last_blocks >= mc.depth:
        raise ValueError(f"fbcache first_blocks + last_blocks must be below the model depth {mc.depth} (something "
                         f"must be cacheable), got {config.first_blocks} + {config.last_blocks}")
    S = sampler.num_steps
    blocks = full_blocks(mc.depth, mc.num_experts)
    skip = config.threshold > 0
    steps = [StepRule("adaptive" if skip and s > 0 else "compute", blocks) for s in range(S)]
    model_skip = ModelSkip(config.threshold, (1.0, 0.0), "first_blocks_residual", config.first_blocks,
                           config.last_blocks) if skip else None
    schedule = assemble("fbcache", mc, sampler, steps, model_skip=model_skip, weights_hash=context.weights_hash,
                        provenance={"method": "fbcache", "config": {"threshold": config.threshold,
                                                                     "first_blocks": config.first_blocks,
                                                                     "last_blocks": config.last_blocks}})
    return replace(schedule, predicted_flops_ratio=None if skip else 1.0)
