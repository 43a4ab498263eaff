"""Shared pieces of the method units: the build context, block rules, assembly and the predicted FLOPs ratio.

Every method is expressed in the MoECa schedule format (:mod:`moeca.policy.schedule`); a reused "MoE"
here always means the whole MoE output of a token (router, routed experts and shared expert), the
format's token-level MoE rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

from moeca.policy.cost import UnitCosts
from moeca.policy.schedule import (ALWAYS, BlockRule, ModelIdentity, ModelSkip, Rule, SamplerIdentity, Schedule,
                                   ScoreConfig, StepRule)


@dataclass(frozen=True)
class Context:
    """What a method's ``build(config, context)`` reads besides its knobs.

    model_config: the model's ``DiTMoEConfig``; sampler_cfg: the ``SamplerConfig`` the schedule is for;
    weights_hash: the weights it was derived for (None = any weights of the architecture);
    summary / run_meta: a trace's drift summary (``moeca.analysis.drift_summary``) and run metadata (MoECa
    only); costs: calibrated wall-clock unit costs (:class:`~moeca.policy.wallclock.WallClockCosts`; MoECa's
    wall-clock target only).
    """

    model_config: Any
    sampler_cfg: Any
    weights_hash: str | None = None
    summary: Any = None
    run_meta: Mapping[str, Any] | None = None
    costs: Any = None


def block_rule(num_experts: int, attn: Rule = ALWAYS, moe: Rule = ALWAYS) -> BlockRule:
    """A block rule with token-level ``attn`` and whole-``moe`` rules.

    With ``moe`` other than ``always`` the replay runtime reuses/recomputes the whole MoE output per
    token; the shared and expert rules are then unused and are written as the same rule for readability.
    """
    inner = ALWAYS if moe.mode == "always" else moe
    return BlockRule(attn=attn, moe=moe, shared=inner, experts=(inner,) * num_experts)


def full_blocks(depth: int, num_experts: int) -> tuple[BlockRule, ...]:
    return tuple(BlockRule.full(num_experts) for _ in range(depth))


def assemble(method: str, config, sampler_cfg, steps: Sequence[StepRule], *, sync: Iterable[int] = (),
             scores: Mapping[str, ScoreConfig] | None = None, model_skip: ModelSkip | None = None,
             weights_hash: str | None = None, provenance: Mapping[str, Any] | None = None,
             predicted: bool = True) -> Schedule:
    """Build a :class:`Schedule` and (when ``predicted``) fill in its predicted FLOPs ratio."""
    kwargs = {} if scores is None else {"scores": dict(scores)}
    schedule = Schedule(method=method, model=ModelIdentity.of(config, weights_hash),
                        sampler=SamplerIdentity.of(sampler_cfg), steps=tuple(steps),
                        sync_refresh_steps=tuple(sorted(set(sync))), model_skip=model_skip,
                        provenance=dict(provenance or {}), **kwargs)
    if predicted:
        schedule = replace(schedule, predicted_flops_ratio=predicted_flops_ratio(schedule, config))
    return schedule


def predicted_flops_ratio(schedule: Schedule, config, skipped_steps: Iterable[int] = ()) -> float:
    """FLOPs of one sampling run under ``schedule`` over full compute (per sample; batch cancels).

    Counts, per (step, block): attention queries (``fraction f`` -> ``ceil(f T)``; a partial attention
    still projects K/V for all tokens), the whole-MoE token rule (router + k experts + shared per
    recomputed token) or the branch rules (router always, each expert's expected refresh share of its
    ``T k / E`` expected pairs, the shared expert's share). Threshold rules count as 0.5 (a guess).
    Steps with ``model == "reuse"`` and the given ``skipped_steps`` run no block. The fixed per-sample
    work outside the blocks is always included. Adaptive (TeaCache) steps count as computed: their
    skips are decided at run time, so the true ratio is only known after replay. Forecast work (per-unit
    forecast terms, the folded stack forecast's rows: ``2 D`` FLOPs per row each) is left out; a replay's
    counted ratio adds it (under 1% of the total on the tiny test models, less on the shipped ones).
    """
    c = UnitCosts.of(config)
    T, k, E = c.num_tokens, c.top_k, config.num_experts
    skipped = set(skipped_steps)
    done = 0.0
    full = schedule.num_steps * (c.fixed_per_sample() + c.depth * T * c.block_per_token())
    for s in range(schedule.num_steps):
        done += c.fixed_per_sample()
        if s in skipped or (not schedule.is_sync(s) and schedule.steps[s].model == "reuse"):
            continue
        for b in range(c.depth):
            rule = schedule.rule(s, b)
            a = rule.attn
            if a.mode == "always":
                done += T * c.attn
            elif a.mode != "reuse":
                q = math.ceil(a.value * T) if a.mode == "fraction" else 0.5 * T
                done += q * c.attn_q + T * c.attn_kv
            m = rule.moe
            if m.mode != "always":
                share = {"reuse": 0.0, "fraction": m.value, "threshold": 0.5}[m.mode]
                done += share * T * (c.router + k * c.expert + c.shared)
                continue
            done += T * c.router + T * rule.shared.expected_refresh() * c.shared
            done += sum(T * k / E * r.expected_refresh() * c.expert for r in rule.experts)
    return done / full
