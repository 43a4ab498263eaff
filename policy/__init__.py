"""moeca.policy: schedule format, MoECa derivation, schedule summaries.

Public API (imported lazily, so ``import moeca.policy`` stays cheap):

- ``Schedule`` (``load``/``save``/``from_json``/``check_compatible``), ``ScheduleError``,
  ``ScheduleMismatch``, ``full_schedule(config, sampler_cfg)`` (:mod:`moeca.policy.schedule`; also
  ``StepRule``, ``BlockRule``, ``Rule``, ``ScoreConfig``, ``ModelSkip``, ``ModelIdentity``,
  ``SamplerIdentity``; JSON Schema ``schedule.schema.json`` via ``schema()``);
- ``DeriveConfig``, ``derive_schedule(summary_df, run_meta, cfg) -> Schedule`` (:mod:`moeca.policy.derive`);
- ``UnitCosts`` (analytic FLOPs per unit row, :mod:`moeca.policy.cost`);
- ``reuse_grid``, ``describe`` (:mod:`moeca.policy.summary`);
- ``retarget`` (another model shape), ``resample_steps`` (:mod:`moeca.policy.transfer`);
- caching methods, one registered unit each: :mod:`moeca.policy.methods` (``REGISTRY``: ``none``,
  ``moeca``, ``fora``, ``taylorseer``, ``toca``, ``teacache``, ``l2c``, ``fbcache``, ``magcache``);
- the ``moeca schedule show|derive|build`` commands are :mod:`moeca.cli.schedule`.
"""
from __future__ import annotations

from moeca.common.lazy import lazy_exports

_EXPORTS = {
    "Schedule": "schedule", "ScheduleError": "schedule", "ScheduleMismatch": "schedule",
    "full_schedule": "schedule", "StepRule": "schedule", "BlockRule": "schedule", "Rule": "schedule",
    "ScoreConfig": "schedule", "ModelSkip": "schedule", "ModelIdentity": "schedule",
    "SamplerIdentity": "schedule", "schema": "schedule",
    "DeriveConfig": "derive", "derive_schedule": "derive",
    "UnitCosts": "cost",
    "reuse_grid": "summary", "describe": "summary",
    "retarget": "transfer", "resample_steps": "transfer",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
