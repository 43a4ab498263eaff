"""Summaries of a schedule: expected reuse per (step, block) and a printable overview.

The expected reuse of a block at a step is the FLOPs-weighted share of its attention, shared expert
and routed experts that the rules leave to the cache (``fraction f`` refreshes ``f``; ``threshold``
rules count 0.5; the router always runs). Newly routed pairs are always computed at run time, so the
real reuse is lower; the schedule's ``predicted_flops_ratio`` accounts for that with traced routing
persistence.
"""
from __future__ import annotations

import numpy as np

from .schedule import BlockRule, Schedule


def block_refresh(rule: BlockRule, flops: dict[str, float], top_k: int) -> float:
    """Expected share of a block's FLOPs computed under ``rule`` (0..1)."""
    full = flops["attn"] + flops["router"] + flops["shared"] + top_k * flops["expert"]
    attn = rule.attn.expected_refresh() * flops["attn"]
    if rule.moe.mode != "always":
        moe = rule.moe.expected_refresh() * (flops["router"] + flops["shared"] + top_k * flops["expert"])
    else:
        experts = float(np.mean([r.expected_refresh() for r in rule.experts]))
        moe = flops["router"] + rule.shared.expected_refresh() * flops["shared"] + top_k * experts * flops["expert"]
    return (attn + moe) / full


def reuse_grid(schedule: Schedule) -> np.ndarray:
    """Expected reused FLOPs share ``[num_steps, depth]``; NaN on ``adaptive`` (decided at run time) steps."""
    flops = schedule.model.unit_flops()
    k = schedule.model.top_k
    out = np.zeros((schedule.num_steps, schedule.model.depth))
    for s in range(schedule.num_steps):
        mode = "compute" if schedule.is_sync(s) else schedule.steps[s].model
        for b in range(schedule.model.depth):
            if mode == "reuse":
                out[s, b] = 1.0
            elif mode == "adaptive":
                out[s, b] = np.nan
            else:
                out[s, b] = 1.0 - block_refresh(schedule.rule(s, b), flops, k)
    return out


def describe(schedule: Schedule) -> str:
    """Multi-line text: identity, sync steps, predicted FLOPs ratio, reuse per step and block."""
    m, smp = schedule.model, schedule.sampler
    grid = reuse_grid(schedule)
    lines = [
        f"method: {schedule.method}   format_version: {schedule.format_version}",
        f"model: {m.name} (fingerprint {m.fingerprint}, weights {m.weights_hash or 'any'}; depth {m.depth}, "
        f"{m.num_experts} experts, top-{m.top_k}, {m.num_tokens} tokens)",
        f"sampler: {smp.kind}, {smp.num_steps} steps, cfg_mode {smp.cfg_mode}, guided {smp.guided}",
        f"sync_refresh_steps ({len(schedule.sync_refresh_steps)}): {list(schedule.sync_refresh_steps)}",
        f"forecast of reused outputs: {schedule.forecast}",
    ]
    if schedule.model_skip is not None:
        lines.append(f"model_skip: threshold {schedule.model_skip.threshold}, poly {list(schedule.model_skip.poly)}")
    ratio = schedule.predicted_flops_ratio
    lines.append("predicted FLOPs ratio: " + ("n/a" if ratio is None else f"{ratio:.3f} ({1 / ratio:.2f}x)"))
    with np.errstate(all="ignore"):
        mean_reuse = np.nanmean(grid) if np.isfinite(grid).any() else float("nan")
    lines.append(f"expected reuse (FLOPs share, rules only): {mean_reuse:.1%} overall")
    lines.append("")
    header = "step  model     " + " ".join(f"b{b:<4d}" for b in range(m.depth)) + "  mean"
    lines.append("reuse fraction per step and block (sync steps marked *):")
    lines.append(header)
    for s in range(schedule.num_steps):
        mode = "sync*" if schedule.is_sync(s) else schedule.steps[s].model
        row = " ".join("  -  " if np.isnan(v) else f"{v:5.0%}" for v in grid[s])
        mean = "  -" if np.isnan(grid[s]).all() else f"{np.nanmean(grid[s]):5.0%}"
        lines.append(f"{s:4d}  {mode:9s} {row}  {mean}")
    return "\n".join(lines)
