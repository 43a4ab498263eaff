"""MagCache: skip whole model calls by a pre-computed curve of the residual's magnitude ratio.

As diffusers defines it (``MagCacheConfig`` / ``hooks/mag_cache.py``, after Ma et al., "MagCache: Fast
Video Generation with Magnitude-Aware Cache", 2025): ``mag_ratios[i]`` is, for a model and sampler, the
mean over tokens of ``||r_i|| / ||r_{i-1}||``, ``r_i`` the residual of all transformer blocks (output minus
input) at step ``i`` (``mag_ratios[0] = 1``), calibrated once on full-compute runs. From step
``round(retention_ratio * S)`` on, each step multiplies an accumulated ratio by ``mag_ratios[i]``, counts
one more step and adds ``|1 - accumulated ratio|`` to an accumulated error; the step is skipped (input plus
the residual of the last computed step) while the error is ``<= threshold`` and the count ``<=
max_skip_steps``, otherwise it is computed and the three accumulators reset. A curve of another length is
resampled to ``S`` by nearest-neighbour interpolation. Nothing depends on the run: the decisions are a
static schedule (``model: reuse`` steps).

Defaults are diffusers': ``threshold 0.24``, ``max_skip_steps 5``, ``retention_ratio 0.1``. The curve is
measured by :func:`moeca.replay.fit.magcache.fit_mag_ratios` (model-running work lives with the engine).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from moeca.policy.schedule import Schedule, StepRule

from .common import Context, assemble, full_blocks

SUMMARY = "MagCache: static whole-model skips from a calibrated residual-magnitude-ratio curve"


@dataclass(frozen=True)
class Config:
    """Knobs of MagCache (defaults: diffusers' ``MagCacheConfig``).

    mag_ratios: the calibrated per-step magnitude ratios (``mag_ratios[0] = 1``); required. Resampled to
        the step count by nearest neighbour when their length differs.
    threshold: the accumulated error below which a step is skipped (0.24).
    max_skip_steps: ``K``, the most consecutive skipped steps (5).
    retention_ratio: the fraction of initial steps never skipped, ``round(retention_ratio * S)`` steps (0.1).
    """

    mag_ratios: tuple[float, ...] = ()
    threshold: float = 0.24
    max_skip_steps: int = 5
    retention_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"magcache threshold must be a finite number >= 0, got {self.threshold}")
        if not isinstance(self.max_skip_steps, int) or isinstance(self.max_skip_steps, bool) or self.max_skip_steps < 0:
            raise ValueError(f"magcache max_skip_steps must be an integer >= 0, got {self.max_skip_steps!r}")
        if not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"magcache retention_ratio must be in [0, 1], got {self.retention_ratio}")
        if any(not (math.isfinite(r) and r > 0) for r in self.mag_ratios):
            raise ValueError(f"magcache mag_ratios must be finite numbers > 0, got {self.mag_ratios}")


def nearest_interp(ratios: tuple[float, ...], length: int) -> tuple[float, ...]:
    """``ratios`` resampled to ``length`` values by nearest neighbour (as diffusers)."""
    if length == 1:
        return (ratios[-1],)
    scale = (len(ratios) - 1) / (length - 1)
    return tuple(ratios[int(round(i * scale))] for i in range(length))


def skipped_steps(config: Config, num_steps: int) -> list[int]:
    """The steps MagCache skips (0 = noisiest); step 0 never is (no residual cached yet)."""
    if not config.mag_ratios:
        raise ValueError("magcache needs mag_ratios: calibrate them with moeca.replay.fit.magcache.fit_mag_ratios "
                         "(the Pareto benchmark does) and pass --set mag_ratios=r0,r1,...")
    ratios = config.mag_ratios if len(config.mag_ratios) == num_steps else nearest_interp(config.mag_ratios, num_steps)
    retention = int(config.retention_ratio * num_steps + 0.5)
    ratio, err, count, out = 1.0, 0.0, 0, []
    for s in range(num_steps):
        if s < retention:
            continue
        ratio *= ratios[s]
        count += 1
        err += abs(1.0 - ratio)
        if s > 0 and err <= config.threshold and count <= config.max_skip_steps:
            out.append(s)
        else:
            ratio, err, count = 1.0, 0.0, 0
    return out


def build(config: Config, context: Context) -> Schedule:
    """Skipped steps are ``model: reuse`` (input plus the residual of the last computed step), the others
    compute everything."""
    mc, sampler = context.model_config, context.sampler_cfg
    S = sampler.num_steps
    skipped = set(skipped_steps(config, S))
    blocks = full_blocks(mc.depth, mc.num_experts)
    steps = [StepRule("reuse" if s in skipped else "compute", blocks) for s in range(S)]
    return assemble("magcache", mc, sampler, steps, weights_hash=context.weights_hash,
                    provenance={"method": "magcache", "config": {
                        "mag_ratios": list(config.mag_ratios), "threshold": config.threshold,
                        "max_skip_steps": config.max_skip_steps, "retention_ratio": config.retention_ratio},
                        "skipped_steps": sorted(skipped)})
