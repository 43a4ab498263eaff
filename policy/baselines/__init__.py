"""Baseline caching policies (issue 6), expressed in the MoECa schedule format.

One module per method, each with a frozen config dataclass documenting every knob and a
``build_schedule(config, model_config, sampler_cfg, weights_hash=None) -> Schedule``:

- :mod:`.none` -- full compute (the reference);
- :mod:`.fora` -- FORA, full refresh every ``N`` steps, all blocks reuse attention and MoE in between;
- :mod:`.taylorseer` -- TaylorSeer, FORA's cadence with every reused output forecast by an order-``m``
  Taylor expansion from finite differences of its last computed values (schedule ``forecast: taylor``);
- :mod:`.toca` -- ToCa, token-wise caching: attention reused, the MoE update recomputed for a scored
  fraction of tokens on non-refresh steps (published DiT schedules as defaults);
- :mod:`.teacache` -- TeaCache, whole-model skip on the accumulated rescaled change of block 0's
  modulated input (polynomial fitted on full-compute runs, :func:`.teacache.fit_rescale_polynomial`);
- :mod:`.l2c` -- Learning-to-Cache, per-step, per-layer reuse routers trained on calibration samples
  (:func:`.l2c.train_router`, trained until the loss converges, then ``build_schedule(router, config,
  ...)``, reuse where the learned value falls below a threshold).

Replay a baseline schedule with :class:`moeca.replay.runtime.ReplayRuntime`: everything a method needs
is in its schedule (ToCa's token selection is the schedule's ``token_selection``, TeaCache's skip its
``model_skip``); ``policy/`` never imports ``replay/``.
"""

BASELINES = ("none", "fora", "taylorseer", "toca", "teacache", "l2c")
"""Names of the baseline methods (also their ``Schedule.method``)."""
