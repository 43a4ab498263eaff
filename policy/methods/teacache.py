"""TeaCache: skip the whole transformer stack while the first block's modulated input barely moved.

Published method (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
CVPR 2025): before each model call, compute block 0's timestep-modulated input ``m_s`` and its relative
L1 change against the previous call, ``d_s = mean|m_s - m_{s-1}| / mean|m_{s-1}|``. A polynomial ``f``
fitted offline maps ``d_s`` to the expected relative L1 change of the model *output*. The rescaled changes
accumulate, ``A += f(d_s)``; while ``A`` stays below ``rel_l1_thresh`` the call skips every block and adds
the residual cached at the last computed call (``blocks(x) - x``); when ``A`` reaches it the blocks run,
the residual is refreshed and ``A`` is reset to 0. The first and the last step are always computed.

The rule is the schedule format's whole-model skip (:class:`~moeca.policy.schedule.ModelSkip`, indicator
``modulated_input``), executed by the replay engine (:mod:`moeca.replay.units.model_skip`). The
polynomial is fitted on full-compute runs by :func:`moeca.replay.fit.teacache.fit_rescale_polynomial`
(model-running work lives with the engine) and passed in as ``coefficients``.

Units: relative L1 changes are dimensionless ratios; the accumulator is in the same units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from moeca.policy.schedule import ModelSkip, Schedule, StepRule

from .common import Context, assemble, full_blocks

SUMMARY = "TeaCache: whole-model skip on the accumulated rescaled change of block 0's modulated input"


@dataclass(frozen=True)
class Config:
    """Knobs of TeaCache.

    rel_l1_thresh: skip while the accumulated rescaled relative L1 change stays below this value
        (dimensionless); 0 computes every step. Published 0.1-0.3 for video models ("slow" to "fast"); the
        right value depends on the model, so the Pareto benchmark sweeps it.
    coefficients: the rescaling polynomial, highest power first (``numpy.polyval`` order). Empty = the
        identity ``f(d) = d``. Fit it on the model you cache (``moeca.replay.fit.teacache``).
    compute_first_steps: initial steps always computed (published 1).
    compute_last_steps: final steps always computed (published 1).
    """

    rel_l1_thresh: float = 0.1
    coefficients: tuple[float, ...] = ()
    compute_first_steps: int = 1
    compute_last_steps: int = 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.rel_l1_thresh) or self.rel_l1_thresh < 0:
            raise ValueError(f"teacache rel_l1_thresh must be a finite number >= 0, got {self.rel_l1_thresh}")
        if any(not math.isfinite(c) for c in self.coefficients):
            raise ValueError(f"teacache coefficients must be finite numbers, got {self.coefficients}")
        if self.compute_first_steps < 1:
            raise ValueError(f"teacache compute_first_steps must be >= 1 (step 0 has no cache), got "
                             f"{self.compute_first_steps}")
        if self.compute_last_steps < 0:
            raise ValueError(f"teacache compute_last_steps must be >= 0, got {self.compute_last_steps}")

    def forced(self, step: int, num_steps: int) -> bool:
        """Is ``step`` (0 = noisiest) always computed?"""
        return step < self.compute_first_steps or step >= num_steps - self.compute_last_steps


def build(config: Config, context: Context) -> Schedule:
    """Forced steps ``compute``, the others ``adaptive`` under a ``modulated_input`` :class:`ModelSkip`
    with the threshold and polynomial; ``rel_l1_thresh == 0`` computes every step. The predicted FLOPs
    ratio is None (the skips are decided at run time)."""
    mc, sampler = context.model_config, context.sampler_cfg
    S, depth, E = sampler.num_steps, mc.depth, mc.num_experts
    blocks = full_blocks(depth, E)
    skip = config.rel_l1_thresh > 0
    steps = [StepRule("adaptive" if skip and not config.forced(s, S) else "compute", blocks) for s in range(S)]
    model_skip = ModelSkip(config.rel_l1_thresh, tuple(config.coefficients or (1.0, 0.0))) if skip else None
    schedule = assemble("teacache", mc, sampler, steps, model_skip=model_skip, weights_hash=context.weights_hash,
                        provenance={"method": "teacache", "config": {
                            "rel_l1_thresh": config.rel_l1_thresh, "coefficients": list(config.coefficients),
                            "compute_first_steps": config.compute_first_steps,
                            "compute_last_steps": config.compute_last_steps}})
    return replace(schedule, predicted_flops_ratio=None if skip else 1.0)
