"""Static decisions the replay engine takes once from a schedule, when the runtime is created.

Nothing here depends on the data: which units a block ever reuses (so units that are never reused
store nothing), which need drift tracking, and the *kind* of every step (:class:`StepKind`: its rules per
block and their summaries; steps with the same rules share one kind object, so a compiled forward has one
graph per kind, not per step number), with the routed-expert rules of a kind as device tensors (codes and
values ``[depth, E]``, built once per device), so a step reads its rules without copying host lists to
the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moeca.policy.schedule import BlockRule, Schedule

MODE_CODE = {"always": 0, "reuse": 1, "fraction": 2, "threshold": 3}


@dataclass(frozen=True, eq=False)
class StepKind:
    """The rules of one kind of step. rules: per block (a sync step's are all ``always``); model: the
    whole-model mode (``compute``, ``reuse``, ``adaptive``; sync steps ``compute``); expert_summary: per
    block ``(all always, any fraction, any scored, all never)`` of the routed-expert rules; forecast_all:
    every block reuses attention and the whole MoE output and nothing tracks drift, so the whole block
    stack can be forecast at once (:mod:`.units.stack`); full: every unit of every block computes. Compared
    by identity (interned)."""

    rules: tuple[BlockRule, ...]
    model: str
    expert_summary: tuple[tuple[bool, bool, bool, bool], ...]
    forecast_all: bool = False
    full: bool = False


class SchedulePlan:
    """Per-block flags and per-(step, block) rule summaries of one schedule. ``fold_stack``: every step
    either computes every unit or forecasts every unit of every block (the sync rule per token, FORA,
    TaylorSeer), so the stack forecast runs folded (:func:`.units.stack.forecast_folded`)."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        S, depth = schedule.num_steps, schedule.model.depth
        self.degree = schedule.forecast_degree
        self.forecast_kind = schedule.forecast_kind
        cached = [s for s in range(S) if not schedule.is_sync(s) and schedule.steps[s].model != "reuse"]

        def reused(block: int, pick) -> bool:
            return any(pick(schedule.steps[s].blocks[block]) for s in cached)

        self.attn_reused = [reused(b, lambda r: r.attn.mode != "always") for b in range(depth)]
        self.moe_token_level = [reused(b, lambda r: r.moe.mode != "always") for b in range(depth)]
        per_branch = ("always", "routing")     # moe rules under which the shared expert and branches are kept
        self.shared_reused = [reused(b, lambda r: r.moe.mode in per_branch and r.shared.mode != "always")
                              for b in range(depth)]
        self.experts_reused = [reused(b, lambda r: r.moe.mode in per_branch and any(e.mode != "always" for e in r.experts))
                               for b in range(depth)]
        self.moe_routing = [reused(b, lambda r: r.moe.mode == "routing") for b in range(depth)]
        """Blocks with a routing-aware forecast step somewhere (:func:`.units.branch.routing_forecast`): their refreshes
        keep the whole MoE output per token, every branch, the shared expert and each token's routed experts."""
        self.track_attn = [self._scored(b, "attn") for b in range(depth)]
        self.track_moe = [self._scored(b, "moe") or self._scored(b, "shared") or self._scored(b, "expert")
                          for b in range(depth)]
        for b in range(depth):
            if self.moe_routing[b] and self.track_moe[b]:
                raise ValueError(f"block {b}: the moe rule routing cannot be combined with scored rules (fraction or "
                                 "threshold) in the same block")
        self.uses_model_skip = schedule.uses_model_skip
        untracked = not any(self.track_attn) and not any(self.track_moe)
        kinds: dict[tuple, StepKind] = {}
        self.kinds: list[StepKind] = []
        for s in range(S):
            rules = tuple(schedule.rule(s, b) for b in range(depth))
            model = "compute" if schedule.is_sync(s) else schedule.steps[s].model
            key = (rules, model)
            if key not in kinds:
                summary = tuple((all(r.mode == "always" for r in br.experts), any(r.mode == "fraction" for r in br.experts),
                                 any(r.scored for r in br.experts), all(r.mode == "reuse" for r in br.experts))
                                for br in rules)
                forecast_all = model == "compute" and untracked and all(
                    br.attn.mode == "reuse" and br.moe.mode == "reuse" for br in rules)
                full = model == "compute" and all(br == BlockRule.full(len(br.experts)) for br in rules)
                kinds[key] = StepKind(rules, model, summary, forecast_all, full)
            self.kinds.append(kinds[key])
        # every step computes everything or forecasts everything: the stack forecast can be folded
        self.fold_stack = any(k.forecast_all for k in self.kinds) and all(k.full or k.forecast_all for k in self.kinds)
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _scored(self, block: int, kind: str) -> bool:
        cfg = self.schedule.score(kind)
        return self.schedule.uses_scores(block, kind) and (cfg.drift_weight > 0 or cfg.staleness_weight > 0)

    def kind(self, step: int) -> StepKind:
        """The (interned) kind of ``step``."""
        return self.kinds[step]

    def expert_tables(self, kind: StepKind, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[depth, E]`` (``MODE_CODE``) and values ``[depth, E]`` float32 of the routed-expert rules
        of ``kind`` on ``device`` (built once per kind and device, on the host side of a forward)."""
        key = (id(kind), device)
        if key not in self._tables:
            codes = torch.tensor([[MODE_CODE[r.mode] for r in br.experts] for br in kind.rules], device=device)
            values = torch.tensor([[r.value for r in br.experts] for br in kind.rules], dtype=torch.float32,
                                  device=device)
            self._tables[key] = (codes, values)
        return self._tables[key]
