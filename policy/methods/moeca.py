"""MoECa: refreshes placed on the traced drift, everything forecast in between (the derivation).

The rule, its knobs and their defaults are :class:`moeca.policy.derive.DeriveConfig` (this unit's
:class:`Config`); :func:`build` runs :func:`moeca.policy.derive.derive_schedule` on the context's trace
summary (and the calibrated wall-clock costs for a wall-clock target). MoECa forecasts at order 1
(``linear``), where TaylorSeer's finite-difference expansion and the interpolating polynomial coincide.
"""
from __future__ import annotations

from moeca.policy.derive import DeriveConfig as Config
from moeca.policy.derive import derive_schedule
from moeca.policy.schedule import Schedule

from .common import Context

SUMMARY = "MoECa: synchronized refreshes placed on the traced drift, per-token/branch forecast in between"

__all__ = ["Config", "SUMMARY", "build"]


def build(config: Config, context: Context) -> Schedule:
    """The derived schedule for the model and sampler of ``context.run_meta`` (a trace's ``run.json``)
    from ``context.summary`` (its drift summary); ``context.costs`` for ``target = wallclock``."""
    if context.summary is None or context.run_meta is None:
        raise ValueError("moeca derives its schedule from a trace: give --trace DIR (a `moeca trace` output)")
    if config.target == "wallclock" and context.costs is None:
        raise ValueError("moeca with target=wallclock needs calibrated costs (`moeca calibrate`); or --set target=flops")
    return derive_schedule(context.summary, context.run_meta, config, context.costs)
