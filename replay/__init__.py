"""moeca.replay: the runtime that follows a schedule, the driver that measures it, and sampling at scale.

Public API (imported lazily, so ``import moeca.replay`` stays cheap):

- ``ReplayRuntime(schedule)`` -- the runtime; install it with ``model.use_runtime(rt)`` around any sampling
  loop (``counters``, ``peak_cache_bytes``);
- ``replay_compare(model, schedule, sampler_cfg, labels, ...) -> ReplayResult`` (``.report``: a
  ``ReplayReport`` with measured speedup, FLOPs, PSNR/SSIM, accuracy and Frechet distance),
  ``write_replay_outputs``, ``sample_batches`` (:mod:`moeca.replay.driver`);
- ``SampleJob``, ``sample_to_npz`` -- K samples with a schedule into the ADM ``.npz``, one process or
  one rank of torchrun (:mod:`moeca.replay.sample_ddp`; command line: ``python -m moeca.replay sample``);
- the engine behind ``ReplayRuntime`` (:mod:`moeca.replay.runtime`, a thin orchestrator): :mod:`.plan`
  (static decisions from the schedule), :mod:`.state` (per-context preallocated caches), :mod:`.forecast`
  (float32 forecast history: the last computed values), :mod:`.counters` (what ran), :mod:`.units` (attention, routed
  branches, per-token units, whole-model skip, token selection hooks, device-path dispatch);
- :mod:`moeca.replay.partial_attention` -- attention for a subset of query tokens;
  :mod:`moeca.replay.cli` -- ``moeca replay``.
"""
from __future__ import annotations

from moeca.common.lazy import lazy_exports

_EXPORTS = {
    "ReplayRuntime": "runtime",
    "replay_compare": "driver", "write_replay_outputs": "driver", "sample_batches": "driver",
    "ReplayReport": "driver", "ReplayResult": "driver",
    "SampleJob": "sample_ddp", "sample_to_npz": "sample_ddp",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
