"""moeca.policy: schedule format, MoECa derivation, schedule summaries.

- :mod:`moeca.policy.schedule` -- ``Schedule`` (``load``/``save``/``from_json``/``check_compatible``),
  ``StepRule``, ``BlockRule``, ``Rule``, ``ScoreConfig``, ``ModelSkip``, ``ModelIdentity``,
  ``SamplerIdentity``, ``full_schedule``; JSON Schema ``schedule.schema.json`` (``schema()``);
- :mod:`moeca.policy.derive` -- ``DeriveConfig``, ``derive_schedule(summary_df, run_meta, cfg)``;
- :mod:`moeca.policy.cost` -- ``UnitCosts`` (analytic FLOPs per unit row);
- :mod:`moeca.policy.summary` -- ``reuse_grid``, ``describe``;
- :mod:`moeca.policy.transfer` -- ``retarget`` (another model shape), ``resample_steps``;
- :mod:`moeca.policy.cli` -- ``moeca schedule show|derive``.
"""
