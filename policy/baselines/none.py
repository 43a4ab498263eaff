"""The ``none`` baseline: full compute, expressed as a schedule that reuses nothing.

Replaying it must reproduce the default runtime bit for bit; the Pareto benchmark uses it as the
reference point (speedup 1, PSNR against itself infinite).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NoneConfig:
    """Full compute has no knobs; the dataclass exists so every baseline has the same shape."""

    def to_dict(self) -> dict:
        return {}


def build_schedule(config: NoneConfig, model_config, sampler_cfg, weights_hash: str | None = None):
    """Every step, block and unit ``always``. -> :class:`moeca.policy.schedule.Schedule`."""
    from moeca.policy.schedule import StepRule
    from .common import assemble, full_blocks
    steps = [StepRule("compute", full_blocks(model_config.depth, model_config.num_experts))
             for _ in range(sampler_cfg.num_steps)]
    return assemble("none", model_config, sampler_cfg, steps, weights_hash=weights_hash,
                    provenance={"baseline": "none", "config": config.to_dict()})
