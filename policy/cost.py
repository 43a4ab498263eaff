"""Analytic FLOPs of the units a schedule can skip (one multiply-add = 2 FLOPs).

Used by the derivation (predicted FLOPs ratio) and by replay (FLOPs actually computed, from the
counted rows). Elementwise work (norms, modulation, residual adds, softmax) is not counted, except the
forecast of reused rows (``forecast_term``: one multiply-add per element and forecast degree).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from moeca.analysis.flops import block_unit_flops


@dataclass(frozen=True)
class UnitCosts:
    """FLOPs per row of each unit of one block, and the fixed per-forward work outside the blocks.

    attn_q: one query token through the Q projection, SDPA over ``T`` keys and the output projection;
    attn_kv: one token through the K and V projections; expert: one (token, expert) pair through a
    routed SwiGLU expert; shared: one token through the shared expert; router: one token through the
    gate; per_sample: adaLN of every block, the final layer's adaLN and the timestep MLP, per sample;
    per_token_fixed: patch embedding and final linear per token; forecast_term: one row of one forecast
    degree (a multiply-add per element, ``2 D``), paid per reused row extrapolated and per computed row
    pushed into a forecast history.
    """

    attn_q: float
    attn_kv: float
    expert: float
    shared: float
    router: float
    per_sample: float
    per_token_fixed: float
    num_tokens: int
    top_k: int
    depth: int
    forecast_term: float = 0.0

    @classmethod
    def of(cls, config) -> "UnitCosts":
        D = config.hidden_size
        patch = config.patch_size ** 2
        unit = block_unit_flops(D, config.expert_hidden, config.shared_hidden, config.num_tokens, config.num_experts)
        return cls(
            attn_q=unit["attn_q"], attn_kv=unit["attn_kv"], expert=unit["expert"], shared=unit["shared"],
            router=unit["router"],
            per_sample=2 * (config.depth * 6 * D * D + 2 * D * D + 256 * D + D * D),
            per_token_fixed=2 * (patch * config.in_channels * D + D * patch * config.out_channels),
            num_tokens=config.num_tokens, top_k=config.top_k, depth=config.depth, forecast_term=2.0 * D,
        )

    @property
    def attn(self) -> float:
        """Full attention per token."""
        return self.attn_q + self.attn_kv

    def block_per_token(self) -> float:
        """One block per token at full compute (attention, router, k experts, shared)."""
        return self.attn + self.router + self.top_k * self.expert + self.shared

    def fixed_per_sample(self) -> float:
        """Work outside the blocks per sample and forward."""
        return self.per_sample + self.num_tokens * self.per_token_fixed


def branch_schedule_flops(schedule, config, rows: int, computed_pairs) -> tuple[float, float]:
    """FLOPs the replay engine counts for one sampling run of a branch-level schedule (MoECa's rules),
    ``(computed, full compute)``, with ``rows`` samples per forward (batched CFG counts both halves) and
    one forward per step.

    computed_pairs ``[num_steps, depth]``: the (token, expert) pairs run on steps whose expert rules are
    not all ``always`` (newly routed pairs plus the rules' share of the candidates: data, known from a
    trace or a replay); ignored elsewhere. Counted as the engine does: attention and shared-expert rows
    (``fraction f`` -> ``ceil(f T)`` queries per sample, ``ceil(f N)`` shared rows), router, pairs, and
    the forecast terms (degree x rows: pushes of computed rows into the history of a unit the schedule
    reuses somewhere, extrapolation of every row of a reusing unit). Token-level MoE rules, threshold
    rules and whole-model skips are data-dependent: refused.
    """
    c = UnitCosts.of(config)
    T, k, L = c.num_tokens, c.top_k, c.depth
    N = rows * T
    deg = schedule.forecast_degree
    S = schedule.num_steps
    reusing = [s for s in range(S) if not schedule.is_sync(s)]
    for s in range(S):
        if schedule.steps[s].model != "compute" and not schedule.is_sync(s):
            raise ValueError(f"branch_schedule_flops: step {s} skips the whole model (data-dependent)")
        for b in range(L):
            r = schedule.rule(s, b)
            if r.moe.mode != "always" or any(u.mode == "threshold" for u in (r.attn, r.shared, *r.experts)):
                raise ValueError(f"branch_schedule_flops: step {s} block {b} has a token-level MoE or threshold "
                                 "rule (data-dependent)")
    done = full = S * rows * c.fixed_per_sample()
    for b in range(L):
        stores = {"attn": any(schedule.rule(s, b).attn.mode != "always" for s in reusing),
                  "shared": any(schedule.rule(s, b).shared.mode != "always" for s in reusing),
                  "expert": any(any(e.mode != "always" for e in schedule.rule(s, b).experts) for s in reusing)}
        for s in range(S):
            r = schedule.rule(s, b)
            full += N * (c.attn + c.shared + c.router) + N * k * c.expert
            terms = 0.0
            for unit, rule, cost in (("attn", r.attn, None), ("shared", r.shared, c.shared)):
                if s == 0 or rule.mode == "always":
                    done += N * (c.attn if cost is None else cost)
                    terms += N * deg if stores[unit] else 0
                    continue
                if rule.mode == "fraction" and cost is None:      # partial attention: K/V of every token
                    m = rows * min(T, math.ceil(rule.value * T))
                    done += m * c.attn_q + N * c.attn_kv
                elif rule.mode == "fraction":
                    m = min(N, math.ceil(rule.value * N))
                    done += m * cost
                else:
                    m = 0
                terms += (m + N) * deg
            done += N * c.router
            if s == 0 or all(e.mode == "always" for e in r.experts):
                done += N * k * c.expert
                terms += N * k * deg if stores["expert"] else 0
            else:
                pairs = float(computed_pairs[s][b])
                done += pairs * c.expert
                terms += (pairs + N * k) * deg
            done += terms * c.forecast_term
    return float(done), float(full)
