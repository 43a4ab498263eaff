"""Baseline caching policies (issue 6), expressed in the MoECa schedule format.

One module per method, each with a frozen config dataclass documenting every knob and a
``build_schedule(config, model_config, sampler_cfg, weights_hash=None) -> Schedule``:

- :mod:`.none` -- full compute (the reference);
- :mod:`.fora` -- FORA, full refresh every ``N`` steps, all blocks reuse attention and MoE in between;
- :mod:`.toca` -- ToCa, token-wise caching: attention reused, the MoE update recomputed for a scored
  fraction of tokens on non-refresh steps (published DiT schedules as defaults);
- :mod:`.teacache` -- TeaCache, whole-model skip on the accumulated rescaled change of block 0's
  modulated input (polynomial fitted on full-compute runs, :func:`.teacache.fit_rescale_polynomial`);
- :mod:`.l2c` -- Learning-to-Cache, per-step, per-layer reuse routers trained on calibration samples
  (:func:`.l2c.train_router`, then ``build_schedule(router, config, ...)``).

Replay a baseline schedule with :func:`moeca.policy.baselines.runtimes.make_runtime` (the replay
runtime, with ToCa's token selection and TeaCache's reference update where they differ).
"""

BASELINES = ("none", "fora", "toca", "teacache", "l2c")
"""Names of the baseline methods (also their ``Schedule.method``)."""
