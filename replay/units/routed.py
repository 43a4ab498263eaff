"""The routed-expert unit: per (token, expert) branch, compute or reuse (plain or forecast).

Cache (:class:`~moeca.replay.state.PairCache`): ``N*k`` storage slots; a persisting (token, expert) pair
keeps its slot from step to step, a newly routed pair takes a slot its token no longer uses (so no
history is gathered per step). At a step the router has run (``topk_idx``, ``topk_w [N, k]``):

1. match: which new pairs persist (``has``) and the storage slot of every pair (``pos``);
2. candidates (persisting pairs) are ranked per expert: newly routed pairs first (always computed), then
   by the online score; each expert's rule sets how many of its pairs run (``always``: all, ``never``:
   the new ones, ``fraction f``: the new ones plus ``ceil(f * candidates)``, ``threshold x``: plus those
   scoring above ``x``);
3. the selected pairs run through their experts (host path: the count on the host, per-expert GEMMs of
   :mod:`moeca.models.dispatch`; device path: grouped GEMMs with device-side offsets) and are pushed into the
   forecast history; every slot is forecast to the current step and combined with the *current* gate
   weights of its pair.

A step whose rules are all ``always`` (or the first step of a context) runs the same dispatch as full
compute and combines in top-k order, so a reuse-nothing schedule is bit-identical to full compute.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from moeca.models.dispatch import run_experts
from moeca.models.runtime import Runtime, combine_slots

from ..state import BlockState, PairCache
from .branch import forecast_branches, lean_ready
from .dispatch import grouped_prefix

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import ReplayRuntime

SCORE_CAP = 1e5       # scores are clamped here for the sort key
FORCED = 2e5          # priority of a newly routed pair (always computed first)
KEY_STRIDE = 1e6      # sort key = expert * stride - priority (exact in float64)


def match_slots(ids: torch.Tensor, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """New pairs ``topk_idx [N, k]`` against the cached experts ``ids [N, k]`` (storage order) ->
    ``(has [N, k] bool: the pair was cached, pos [N, k]: its storage slot)``. Newly routed pairs take
    the token's freed slots in slot order. A token's experts are distinct, so a pair matches one slot."""
    k = topk_idx.shape[1]
    eq = ids.unsqueeze(1) == topk_idx.unsqueeze(2)                              # [N, new j, storage s]
    has = eq.any(dim=2)
    src = (eq * torch.arange(k, device=ids.device)).sum(dim=2)
    kept = eq.any(dim=1)
    new_rank = torch.cumsum((~has).to(torch.int64), dim=1) - 1
    free_first = torch.argsort(kept.to(torch.int32), dim=1, stable=True)         # freed slots first
    pos = torch.where(has, src, free_first.gather(1, new_rank.clamp_min(0)))
    return has, pos


def run_routed(rt: "ReplayRuntime", block, st: BlockState, flat: torch.Tensor, topk_idx: torch.Tensor,
               topk_w: torch.Tensor, drift: torch.Tensor | None) -> torch.Tensor:
    """Gate-weighted routed-expert output ``[N, D]`` (the shared expert is added by the caller)."""
    bi = block.index
    N, k = topk_idx.shape
    D = flat.shape[1]
    cache = st.experts
    all_always, any_fraction, any_scored, all_never = rt.kind.expert_summary[bi]
    if all_always or not cache.valid:
        slot_out = all_pairs(rt, block, flat, topk_idx)
        rt.count("expert", bi, N * k)
        if rt.plan.experts_reused[bi]:
            _store_all(rt, bi, cache, topk_idx, slot_out.view(N * k, D))
        return combine_slots(slot_out, topk_w)
    if lean_ready(rt, cache, rt.kind.expert_summary[bi]):
        return forecast_branches(rt, block, cache, flat, topk_idx, topk_w)

    has, pos = match_slots(cache.ids, topk_idx)
    base = (torch.arange(N, device=flat.device) * k).unsqueeze(1)
    spos = (base + pos).reshape(-1)                                              # storage row of each pair
    new_slot = torch.zeros_like(has).scatter_(1, pos, ~has).reshape(-1)
    cache.ids.scatter_(1, pos, topk_idx)
    cache.hist.forget(new_slot)
    if cache.age is not None:
        cache.age.masked_fill_(new_slot, 0.0)
        cache.acc.masked_fill_(new_slot, 0.0)
        cache.bump(None if drift is None else drift.repeat_interleave(k))
    flat_idx, hasf = topk_idx.reshape(-1), has.reshape(-1)
    if all_never and not rt.device_path:     # MoECa's forecast steps: exactly the newly routed pairs run
        _compute_host(rt, block, cache, flat, torch.nonzero(~hasf).squeeze(1), flat_idx, None, spos)
        return _forecast_combine(rt, bi, cache, pos, topk_w, flat.dtype)
    if any_scored and cache.age is not None:
        cfg = rt.schedule.score("expert")
        score = (cache.acc * cfg.drift_weight + cache.age * cfg.staleness_weight).index_select(0, spos)
    else:
        score = torch.zeros(N * k, device=flat.device)
    codes, values = rt.expert_codes[bi], rt.expert_values[bi]
    E = codes.shape[0]
    # one sort puts, per expert, the forced pairs (newly routed) first, then candidates by score
    prio = torch.where(hasf, score.clamp(0.0, SCORE_CAP), FORCED).double()
    order = torch.argsort(flat_idx.double() * KEY_STRIDE - prio, stable=True)
    zeros = torch.zeros(E, dtype=torch.float64, device=flat.device)
    per_e = zeros.scatter_add(0, flat_idx, torch.ones_like(prio))
    n_new = zeros.scatter_add(0, flat_idx, (~hasf).double())
    n_cand = per_e - n_new
    extra = torch.where(codes == 0, n_cand, torch.zeros_like(n_cand))
    if any_fraction:
        extra = torch.where(codes == 2, torch.ceil(values.double() * n_cand), extra)
    if any_scored:
        above = hasf & (score > values.index_select(0, flat_idx))
        extra = torch.where(codes == 3, zeros.scatter_add(0, flat_idx, above.double()), extra)
    budget = n_new + extra
    slots, valid = _chosen(order, flat_idx, per_e, budget)
    if not (rt.device_path and _compute_device(rt, block, cache, flat, slots, valid, budget, spos)):
        _compute_host(rt, block, cache, flat, slots, flat_idx, budget, spos)
    return _forecast_combine(rt, bi, cache, pos, topk_w, flat.dtype)


def _forecast_combine(rt, bi: int, cache: PairCache, pos: torch.Tensor, topk_w: torch.Tensor, dtype) -> torch.Tensor:
    """Every storage slot forecast to the current step, combined with the current gate weight of its pair."""
    N, k = pos.shape
    rt.note_reused("routed-expert", bi, cache)
    rt.count("forecast", bi, N * k * rt.plan.degree)
    weights = torch.zeros_like(topk_w).scatter_(1, pos, topk_w)                 # current gates, storage order
    return cache.hist.combine(rt.step, weights).to(dtype)


def all_pairs(rt: "ReplayRuntime", block, flat: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Every routed pair computed -> ``[N, k, D]``: the default runtime's dispatch (bit-identical full
    compute; its device path on the replay's device path)."""
    return Runtime.routed_experts(rt, block, flat, topk_idx)


def _store_all(rt: "ReplayRuntime", bi: int, cache: PairCache, topk_idx: torch.Tensor, values: torch.Tensor) -> None:
    """Every pair computed now (``values [N*k, D]`` in top-k order): into the cache, keeping the history
    of persisting pairs when forecasting."""
    N, k = topk_idx.shape
    degree = rt.plan.degree
    if cache.valid and degree > 0 and cache.ids is not None and cache.ids.shape == topk_idx.shape:
        has, pos = match_slots(cache.ids, topk_idx)
        spos = ((torch.arange(N, device=values.device) * k).unsqueeze(1) + pos).reshape(-1)
        cache.hist.forget(torch.zeros_like(has).scatter_(1, pos, ~has).reshape(-1))
        cache.ids.scatter_(1, pos, topk_idx)
        cache.hist.push_all(torch.empty_like(values).index_copy_(0, spos, values), rt.step)
        rt.count("gather", bi, N * k)
    else:
        cache.ensure(degree, N * k, values.shape[1], rt.plan.track_moe[bi], values.device, rt.plan.forecast_kind)
        if cache.ids is None or cache.ids.shape != topk_idx.shape:
            cache.ids = torch.empty_like(topk_idx)
        cache.ids.copy_(topk_idx)
        cache.hist.forget(torch.ones(N * k, dtype=torch.bool, device=values.device))
        cache.hist.push_all(values, rt.step)
    if rt.plan.moe_routing[bi]:       # the routed experts every token has now, for routing-aware steps
        if cache.ref_ids is None or cache.ref_ids.shape != cache.ids.shape:
            cache.ref_ids = torch.empty_like(cache.ids)
        cache.ref_ids.copy_(cache.ids)
    cache.computed(None)
    cache.valid = True
    rt.count("forecast", bi, N * k * degree)


def _chosen(order: torch.Tensor, flat_idx: torch.Tensor, per_e: torch.Tensor, budget: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected pairs, on the device: ``order`` sorts pairs by expert (forced first, then by score);
    the first ``budget[e]`` of each expert's segment run. -> ``(slots [M]: the pairs' slots with the
    selected ones first, grouped by expert; chosen_first [M] bool: position holds a selected pair)``."""
    M, E = order.shape[0], per_e.shape[0]
    ar = torch.arange(M, device=order.device)
    seg_start = (torch.cumsum(per_e, 0) - per_e).long()
    e_sorted = flat_idx.index_select(0, order)
    chosen = (ar - seg_start.index_select(0, e_sorted)) < budget.long().index_select(0, e_sorted)
    order2 = torch.argsort((~chosen).long() * E + e_sorted, stable=True)      # chosen first, by expert
    return order.index_select(0, order2), ar < budget.sum()


def _compute_host(rt, block, cache: PairCache, flat, slots, flat_idx, budget, spos) -> None:
    """Host path: the count of selected pairs comes to the host (free on a CPU) and exactly those pairs
    run through the models' dispatch (per-expert GEMMs; the runtime's ``expert`` seam when overridden).
    ``slots``: the selected pairs first; ``budget [E]`` their count per expert (None: all of ``slots``)."""
    bi, k = block.index, block.moe.top_k
    n = slots.shape[0] if budget is None else int(budget.sum())              # the one host sync
    if not n:
        return
    sel = slots[:n]
    seam = None if type(rt).expert is Runtime.expert else functools.partial(rt.expert, block)
    values = run_experts(block, flat.index_select(0, sel // k), flat_idx.index_select(0, sel), path="loop",
                         expert=seam)
    rows = spos.index_select(0, sel)
    cache.hist.push_rows(rows, values, rt.step)
    cache.computed(rows)
    rt.count("expert", bi, n)
    rt.count("gather", bi, 3 * n)
    rt.count("forecast", bi, n * rt.plan.degree)


def _compute_device(rt, block, cache: PairCache, flat, slots, valid, budget, spos) -> bool:
    """Device path: the selected pairs (first in ``slots``, grouped by expert) run in grouped GEMMs over a
    fixed-size buffer with device-side offsets; no host sync; the count stays on the device. False when
    the experts cannot be stacked (the caller takes the host path)."""
    bi, k = block.index, block.moe.top_k
    M = slots.shape[0]
    y = grouped_prefix(block, flat.index_select(0, slots // k), torch.cumsum(budget, 0).to(torch.int32))
    if y is None:
        return False
    rows = spos.index_select(0, slots)
    mask = torch.zeros(M, dtype=torch.bool, device=flat.device).index_copy_(0, rows, valid)
    cache.hist.push_where(mask, torch.empty_like(y).index_copy_(0, rows, y), rt.step)
    if cache.age is not None:
        cache.age.masked_fill_(mask, 0.0)
        cache.acc.masked_fill_(mask, 0.0)
    rt.count("expert", bi, budget.sum())
    rt.count("gather", bi, 3 * M)
    rt.count("forecast", bi, M * rt.plan.degree)
    return True
