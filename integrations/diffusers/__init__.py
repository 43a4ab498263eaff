"""MoECa on diffusers' MoE transformers (HiDream-I1), through diffusers' own hooks (DESIGN section 1b).

Needs the optional extra: ``pip install "moeca[diffusers]"``. Public API::

    from moeca.integrations.diffusers import apply_schedule
    handle = apply_schedule(pipe.transformer, "schedule.json")   # then call the pipeline as usual
    handle.remove()                                              # the stock forward again

Importing this package checks the diffusers version (:mod:`.compat`); the submodules import diffusers
only here, never moeca's core.
"""
from __future__ import annotations

from .compat import SUPPORTED_CLASSES, SUPPORTED_RANGE, require_diffusers

require_diffusers()

from .apply import MoECaHandle, apply_schedule, none_schedule  # noqa: E402  (after the version check)

__all__ = ["MoECaHandle", "SUPPORTED_CLASSES", "SUPPORTED_RANGE", "apply_schedule", "none_schedule"]
