"""Engine-side fits of caching methods: work that runs the model to find a method's knobs.

- :mod:`.teacache` -- TeaCache's rescaling polynomial;
- :mod:`.l2c` -- Learning-to-Cache's routers;
- :mod:`.magcache` -- MagCache's magnitude-ratio curve.

Each returns plain numbers (or a file) that the policy unit of the method (:mod:`moeca.policy.methods`)
takes as knobs; policy never runs the model. MoECa's wall-clock calibration is :mod:`moeca.replay.calibrate`.
"""
