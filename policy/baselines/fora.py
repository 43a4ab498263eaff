"""FORA baseline: static step-level caching of every block's attention and MoE output.

Original method (Selvaraju et al., "FORA: Fast-Forward Caching in Diffusion Transformer
Acceleration", 2024): every ``N`` sampling steps the model runs in full and every transformer layer's
attention and MLP outputs are cached; on the ``N - 1`` steps in between each layer reuses its cached
attention and MLP outputs instead of computing them (the residual stream, adaLN modulation, embedders
and final layer still run). ``N`` is the only knob; the paper reports ``N`` = 2..7 (3 as the balanced
setting on DiT).

Here the MLP is the whole MoE update (routed experts and the shared expert): on a non-refresh step
nothing of the MoE runs, not even the router.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForaConfig:
    """Knobs of FORA.

    interval: ``N``; steps ``0, N, 2N, ...`` are computed in full, the others reuse every block's
        attention and MoE output from the last full step. ``1`` reuses nothing (full compute).
        Published default on DiT: 3.
    compute_last_step: also compute the final step in full (not part of the published method, which
        is purely periodic; off by default).
    """

    interval: int = 3
    compute_last_step: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"fora interval must be an integer >= 1 (1 = no reuse), got {self.interval!r}")

    def to_dict(self) -> dict:
        return {"interval": self.interval, "compute_last_step": self.compute_last_step}


def refresh_steps(config: ForaConfig, num_steps: int) -> list[int]:
    """Steps (0 = noisiest) computed in full; every other step reuses all blocks."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    steps = {s for s in range(num_steps) if s % config.interval == 0}
    if config.compute_last_step:
        steps.add(num_steps - 1)
    return sorted(steps)


def reuse_fraction(config: ForaConfig, num_steps: int) -> float:
    """Fraction of (step, block) attention and MoE evaluations that are reused."""
    return 1.0 - len(refresh_steps(config, num_steps)) / num_steps


def build_schedule(config: ForaConfig, model_config, sampler_cfg, weights_hash: str | None = None):
    """The FORA schedule: refresh steps are sync steps; every other step reuses every block's
    attention output and whole MoE output (``never``). -> :class:`moeca.policy.schedule.Schedule`."""
    from moeca.policy.schedule import NEVER, StepRule
    from .common import assemble, block_rule, full_blocks
    S, depth, E = sampler_cfg.num_steps, model_config.depth, model_config.num_experts
    sync = refresh_steps(config, S)
    reuse = tuple(block_rule(E, attn=NEVER, moe=NEVER) for _ in range(depth))
    steps = [StepRule("compute", full_blocks(depth, E) if s in sync else reuse) for s in range(S)]
    return assemble("fora", model_config, sampler_cfg, steps, sync=sync, weights_hash=weights_hash,
                    provenance={"baseline": "fora", "config": config.to_dict()})
