"""FORA: static step-level caching of every block's attention and MoE output.

Published method (Selvaraju et al., "FORA: Fast-Forward Caching in Diffusion Transformer Acceleration",
2024): the sampler's step index ``i`` counts *down* from ``S - 1`` (noisiest) to 0; the model runs in
full when ``i % N == 0`` (and at the first step, which has nothing cached), caching every layer's
attention and MLP outputs; the other steps reuse them (the residual stream, adaLN modulation,
embedders and final layer still run). Counting down makes the *final* step (``i = 0``) a full step:
at ``S = 50, N = 3`` the full steps are the first and ``i = 48, 45, ..., 0``, 18 of them. ``N`` is the
only knob; the paper sweeps ``N = 2..7`` (3 the balanced setting on DiT).

Here the MLP is the whole MoE update (routed experts and shared expert): on a reused step nothing of
the MoE runs, not even the router.
"""
from __future__ import annotations

from dataclasses import dataclass

from moeca.policy.schedule import REUSE, Schedule, StepRule

from .common import Context, assemble, block_rule, full_blocks

SUMMARY = "FORA: full every N steps counted down from the last step, everything reused in between"


@dataclass(frozen=True)
class Config:
    """Knobs of FORA.

    interval: ``N``; full compute where the countdown step ``S - 1 - s`` is a multiple of ``N`` (and at
        step 0), every block's attention and MoE output reused from the last full step otherwise.
        ``1`` reuses nothing. Published default on DiT: 3 (swept 2..7).
    """

    interval: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise ValueError(f"fora interval must be an integer >= 1 (1 = no reuse), got {self.interval!r}")


def refresh_steps(config: Config, num_steps: int) -> list[int]:
    """Steps (``s = 0`` noisiest) computed in full: ``s = 0`` and every ``s`` with ``(S - 1 - s) % N == 0``
    (so the final step ``s = S - 1`` always is)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return sorted({0} | {s for s in range(num_steps) if (num_steps - 1 - s) % config.interval == 0})


def build(config: Config, context: Context) -> Schedule:
    """Refresh steps are sync steps; every other step reuses every block's attention output and whole MoE
    output (``never``)."""
    mc, sampler = context.model_config, context.sampler_cfg
    S, depth, E = sampler.num_steps, mc.depth, mc.num_experts
    sync = refresh_steps(config, S)
    reuse = tuple(block_rule(E, attn=REUSE, moe=REUSE) for _ in range(depth))
    steps = [StepRule("compute", full_blocks(depth, E) if s in sync else reuse) for s in range(S)]
    return assemble("fora", mc, sampler, steps, sync=sync, weights_hash=context.weights_hash,
                    provenance={"method": "fora", "config": {"interval": config.interval}})
