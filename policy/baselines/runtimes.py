"""Replay runtimes for the baselines: the plain replay runtime, or a thin subclass where a published
method selects tokens differently from MoECa's online score.

- ToCa: :class:`TocaReplayRuntime` -- the same caches, gathers and counters as
  :class:`~moeca.replay.runtime.ReplayRuntime`, but the whole-MoE ``fraction`` rule picks tokens the
  ToCa way (per sample, normalised score, staleness, spatial bonus).
- FORA, TeaCache, L2C, none: the plain replay runtime follows their schedules as they are (TeaCache's
  whole-model skip is the schedule format's ``model_skip``).

:func:`make_runtime` picks the right one from a schedule's ``method`` and ``provenance``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeca.policy.schedule import Schedule
from moeca.replay.runtime import ReplayRuntime

from .toca import TocaConfig, select_tokens, spatial_bonus


class TocaReplayRuntime(ReplayRuntime):
    """Replay with ToCa's token selection for the whole-MoE ``fraction`` rule.

    Per sample (not across the batch): score ``[B, T]`` = L2-normalised (over the sample's tokens)
    accumulated relative input drift since the token's MoE output was computed -- the stand-in for
    ToCa's ``1 - cos`` similarity score, which needs the same kind of input change -- plus
    ``soft_fresh_weight * staleness / fresh_threshold`` (s3), then the s4 spatial bonus; the
    ``round(f * T)`` best tokens of each sample are recomputed. Other rules behave as in the base class.
    """

    def __init__(self, schedule: Schedule, config: TocaConfig):
        super().__init__(schedule)
        self.toca = config

    def _select_rows(self, cache, rule, N, kind):
        if kind != "moe" or rule.mode != "fraction" or cache.acc is None:
            return super()._select_rows(cache, rule, N, kind)
        B = self._cs.batch
        T = N // B
        count = int(round(rule.value * T))
        if count == 0:
            return None
        drift = F.normalize(cache.acc.view(B, T), dim=-1, p=2)
        score = drift + self.toca.soft_fresh_weight * cache.age.view(B, T) / self.toca.fresh_threshold
        score = spatial_bonus(score, self.toca.spatial_bonus, self.toca.spatial_grid)
        idx = select_tokens(score, count)
        return (idx + torch.arange(B, device=idx.device).unsqueeze(1) * T).reshape(-1)


def toca_config_from(schedule: Schedule) -> TocaConfig:
    """The :class:`TocaConfig` recorded in a ToCa schedule's provenance."""
    raw = dict(schedule.provenance.get("config", {}))
    if "sensitive_window" in raw:
        raw["sensitive_window"] = tuple(raw["sensitive_window"])
    try:
        return TocaConfig(**raw)
    except TypeError as exc:
        raise ValueError(f"schedule provenance.config is not a ToCa configuration ({exc}); rebuild the schedule "
                         "with moeca.policy.baselines.toca.build_schedule") from None


def make_runtime(schedule: Schedule) -> ReplayRuntime:
    """The runtime that replays ``schedule`` as its method intends."""
    if schedule.method == "toca" and schedule.provenance.get("baseline") == "toca":
        return TocaReplayRuntime(schedule, toca_config_from(schedule))
    return ReplayRuntime(schedule)
