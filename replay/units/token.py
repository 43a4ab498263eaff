"""Per-token units: the shared expert and the whole-MoE output (FORA / ToCa token-level reuse).

A unit computes every row (rule ``always``, or nothing cached yet), or reuses its cached rows -- plain or
forecast -- and recomputes the rows its rule selects. Shapes: ``flat [N, D]`` -> ``[N, D]``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from moeca.policy.schedule import Rule

from ..state import RowCache
from .selection import select_rows

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import ReplayRuntime


def run_token_unit(rt: "ReplayRuntime", block: int, kind: str, cache: RowCache, rule: Rule, flat: torch.Tensor,
                   fn: Callable[[torch.Tensor], torch.Tensor], stores: bool, track: bool,
                   drift: torch.Tensor | None, count: Callable[[int | torch.Tensor], None]) -> torch.Tensor:
    """One per-token unit at the current step.

    fn: the unit on rows ``[m, D] -> [m, D]`` (counted by ``count(m)``); stores: the schedule reuses
    this unit somewhere (else nothing is cached); track: keep age and drift for scored rules.
    """
    N, D = flat.shape
    step = rt.step
    if rule.mode == "always" or not cache.valid:
        out = fn(flat)
        count(N)
        if stores:
            cache.ensure(rt.plan.degree, N, D, track, flat.device, rt.plan.forecast_kind)
            cache.hist.push_all(out, step)
            cache.computed(None)
            cache.valid = True
            rt.count("forecast", block, N * rt.plan.degree)
        return out
    cache.bump(drift)
    sel = select_rows(cache, rule, rt.schedule.score(kind), rt.schedule.token_selection, rt.batch, flat,
                      rt.device_path, kind)
    if sel.rows is not None:
        m = int(sel.rows.numel())
        cache.hist.push_rows(sel.rows, fn(flat.index_select(0, sel.rows)), step)
        cache.computed(sel.rows)
        count(m)
        rt.count("gather", block, 2 * m)
        rt.count("forecast", block, m * rt.plan.degree)
    elif sel.mask is not None:       # device path, threshold rule: every row computed, the selected ones kept
        cache.hist.push_where(sel.mask, fn(flat), step)
        if cache.age is not None:
            cache.age.masked_fill_(sel.mask, 0.0)
            cache.acc.masked_fill_(sel.mask, 0.0)
        count(N)
        rt.count("padded", block, N - sel.mask.sum())
        rt.count("gather", block, N)
        rt.count("forecast", block, N * rt.plan.degree)
    if sel.nothing or sel.mask is not None or sel.rows.numel() < N:
        rt.note_reused(kind, block, cache)
    rt.count("forecast", block, N * rt.plan.degree)
    return cache.hist.forecast(step).to(flat.dtype)
