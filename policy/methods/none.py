"""``none``: full compute, expressed as a schedule that reuses nothing.

Replaying it must reproduce the default runtime bit for bit; the Pareto benchmark uses it as the
reference point (speedup 1, PSNR against itself infinite).
"""
from __future__ import annotations

from dataclasses import dataclass

from moeca.policy.schedule import Schedule, StepRule

from .common import Context, assemble, full_blocks

SUMMARY = "full compute (the reference)"


@dataclass(frozen=True)
class Config:
    """Full compute has no knobs; the dataclass exists so every method has the same shape."""


def build(config: Config, context: Context) -> Schedule:
    """Every step, block and unit ``always``."""
    mc, S = context.model_config, context.sampler_cfg.num_steps
    steps = [StepRule("compute", full_blocks(mc.depth, mc.num_experts)) for _ in range(S)]
    return assemble("none", mc, context.sampler_cfg, steps, weights_hash=context.weights_hash,
                    provenance={"method": "none", "config": {}})
