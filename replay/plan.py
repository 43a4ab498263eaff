"""Static decisions the replay engine takes once from a schedule, when the runtime is created.

Nothing here depends on the data: which units a block ever reuses (so units that are never reused
store nothing), which need drift tracking, and the routed-expert rules of every (step, block) as device
tensors (codes and values ``[num_steps, depth, E]``, built once per device), so a step reads its rules
by indexing, never by copying host lists to the device.
"""
from __future__ import annotations

import torch

from moeca.policy.schedule import Schedule

MODE_CODE = {"always": 0, "never": 1, "fraction": 2, "threshold": 3}


class SchedulePlan:
    """Per-block flags and per-(step, block) rule summaries of one schedule."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        S, depth = schedule.num_steps, schedule.model.depth
        self.degree = schedule.forecast_degree
        cached = [s for s in range(S) if not schedule.is_sync(s) and schedule.steps[s].model != "reuse"]

        def reused(block: int, pick) -> bool:
            return any(pick(schedule.steps[s].blocks[block]) for s in cached)

        self.attn_reused = [reused(b, lambda r: r.attn.mode != "always") for b in range(depth)]
        self.moe_token_level = [reused(b, lambda r: r.moe.mode != "always") for b in range(depth)]
        self.shared_reused = [reused(b, lambda r: r.moe.mode == "always" and r.shared.mode != "always")
                              for b in range(depth)]
        self.experts_reused = [reused(b, lambda r: r.moe.mode == "always" and any(e.mode != "always" for e in r.experts))
                               for b in range(depth)]
        self.track_attn = [self._scored(b, "attn") for b in range(depth)]
        self.track_moe = [self._scored(b, "moe") or self._scored(b, "shared") or self._scored(b, "expert")
                          for b in range(depth)]
        self.uses_model_skip = schedule.uses_model_skip
        self._expert_summary = {}
        for s in range(S):
            for b in range(depth):
                rules = schedule.rule(s, b).experts
                self._expert_summary[s, b] = (all(r.mode == "always" for r in rules),
                                              any(r.mode == "fraction" for r in rules),
                                              any(r.scored for r in rules),
                                              all(r.mode == "never" for r in rules))
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _scored(self, block: int, kind: str) -> bool:
        cfg = self.schedule.score(kind)
        return self.schedule.uses_scores(block, kind) and (cfg.drift_weight > 0 or cfg.staleness_weight > 0)

    def expert_summary(self, step: int, block: int) -> tuple[bool, bool, bool, bool]:
        """``(all always, any fraction, any scored, all never)`` of the routed-expert rules at (step, block)."""
        return self._expert_summary[step, block]

    def prepare(self, device: torch.device) -> None:
        """Build the rule tables on ``device`` (once per device, before the first block runs)."""
        if device in self._tables:
            return
        s = self.schedule
        rules = [[s.rule(st, b).experts for b in range(s.model.depth)] for st in range(s.num_steps)]
        codes = torch.tensor([[[MODE_CODE[r.mode] for r in rs] for rs in row] for row in rules], device=device)
        values = torch.tensor([[[r.value for r in rs] for rs in row] for row in rules], dtype=torch.float32,
                              device=device)
        self._tables[device] = (codes, values)

    def expert_rules(self, step: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[E]`` (``MODE_CODE``) and values ``[E]`` float32 of the expert rules at (step, block)."""
        codes, values = self._tables[device]
        return codes[step, block], values[step, block]
