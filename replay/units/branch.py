"""The branch level's forecast step, lean: every routed expert's rule is ``never`` and nothing is scored.

Such a step (MoECa's ``sync`` rule at the branch level between refreshes) computes exactly the newly
routed (token, expert) pairs and forecasts every pair's branch, combined with the current gates. The
general selection path (:func:`.routed.run_routed`: ranking, budgets, scores) gives the same result with
about twice the operators; here, per block:

1. match the new top-k against the cached experts (:func:`.routed.match_slots`; on the host path
   :func:`match_host`) and store the new ids;
2. compute the new pairs (:func:`few_pairs`: the models' per-expert loop on the host path; on the device
   path grouped GEMMs over a fixed ``N*k`` buffer with device-side offsets, no host sync);
3. write their value as the newest of their history with one kept value, at this step (what forgetting
   the freed slot and pushing the new value does: the older levels are masked by the count);
4. forecast every slot and combine with the current gates (:meth:`~moeca.replay.forecast.History.combine`).

The counters record what the general path records. Shapes: ``flat [N, D]``, ``topk_idx``/``topk_w [N, k]``.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from moeca.models.dispatch import ExpertStack, expert_stack, run_experts
from moeca.models.dit_moe import DiTMoEBlock, modulate
from moeca.models.runtime import Runtime

from ..state import BlockState, PairCache, RowCache
from .attention import reused_attention
from .dispatch import grouped_prefix

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import ReplayRuntime


def lean_ready(rt: "ReplayRuntime", cache: PairCache, summary: tuple[bool, bool, bool, bool]) -> bool:
    """Whether a block's routed step can take this path: all its experts ``never``, a valid cache, no
    scores kept (host flags only)."""
    return rt.lean and summary[3] and cache.valid and cache.age is None and cache.hist is not None


def few_pairs(rt: "ReplayRuntime", block, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Unweighted outputs of a few pairs on the host path: expert ``experts[i]`` on ``rows[i]`` -> ``[m, D]``.

    Through the stacked SwiGLU experts (:func:`sorted_swiglu`: rows sorted by expert on the host, each touched
    expert's gate and up projections one GEMM into a shared buffer, one SiLU over all rows, then each expert's
    down projection); an expert without a new row is not read, which matters where experts are large (S/2's are
    7 MB each). When the runtime's ``expert`` seam is overridden or the experts cannot be stacked, the models'
    per-expert loop."""
    overridden = type(rt).expert is not Runtime.expert
    stack = None if overridden else expert_stack(block.moe)
    if stack is not None and rows.shape[0]:
        return sorted_swiglu(stack, rows, experts.numpy())
    seam = functools.partial(rt.expert, block) if overridden else None
    return run_experts(block, rows, experts, path="loop", expert=seam)


def sorted_swiglu(stack: ExpertStack, rows: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """Expert ``ids[i]`` on ``rows[i]`` (``rows [m, D]``, ``ids [m]`` int64 on the host) -> ``[m, D]``.

    The rows are sorted by expert on the host; each touched expert's gate and up projections run as one GEMM
    (``[n, D] x [D, 2H]``) into a ``[m, 2H]`` buffer, the SwiGLU activation runs once over all rows, and each
    expert's down projection writes its slice of the output. At ~10 rows per expert a GEMM is launch-bound: this
    is ``2 E' + 4`` operators for ``E'`` touched experts (the models' loop takes about five per expert, padding
    to ``[E, max rows, D]`` computes up to twice the rows)."""
    H = stack.hidden
    order = np.argsort(ids, kind="stable")
    counts = np.bincount(ids, minlength=stack.gate_up.shape[0]).tolist()
    where = torch.from_numpy(order)
    xs = rows.index_select(0, where)
    gu = xs.new_empty(xs.shape[0], 2 * H)
    spans = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, start, start + n))
            torch.mm(xs[start:start + n], stack.gate_up[e].t(), out=gu[start:start + n])
            start += n
    act = F.silu(gu[:, :H]).mul_(gu[:, H:])
    ys = torch.empty_like(xs)
    for e, a, b in spans:
        torch.mm(act[a:b], stack.down[e].t(), out=ys[a:b])
    return torch.empty_like(ys).index_copy_(0, where, ys)


def match_host(ids: torch.Tensor, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`.routed.match_slots` on the host, for CPU tensors, in NumPy (a few microseconds an operation
    where torch's are tens at these sizes); stores the new ids into ``ids [N, k]`` in place. ->
    ``(pos [N, k]: the storage slot of every new pair, sel [m]: the newly routed pairs n*k + j, rows [m]:
    their storage rows)``. Only the tokens with a new pair go through the freed-slot assignment."""
    cached, new_ids = ids.numpy(), topk_idx.numpy()
    N, k = new_ids.shape
    # column by column (k^2 operations on [N]): NumPy's reductions over an axis of length k are slow
    has, pos = np.zeros((N, k), dtype=bool), np.zeros((N, k), dtype=np.int64)
    for j in range(k):
        for slot in range(k):               # a token's experts are distinct: at most one slot matches
            eq = new_ids[:, j] == cached[:, slot]
            has[:, j] |= eq
            if slot:
                pos[:, j] += eq * slot
    moved = np.flatnonzero(~_all_columns(has))                                # tokens with a newly routed pair
    if moved.size:
        eq = cached[moved, None, :] == new_ids[moved, :, None]                # [m, new j, storage s]
        sub_has, sub_kept = has[moved], eq.any(axis=1)
        free_first = np.argsort(sub_kept, axis=1, kind="stable")              # freed slots first, in slot order
        rank = np.clip(np.cumsum(~sub_has, axis=1) - 1, 0, None)
        pos[moved] = np.where(sub_has, pos[moved], np.take_along_axis(free_first, rank, axis=1))
        sel = np.flatnonzero(~has)
        rows = (sel // k) * k + pos.reshape(-1)[sel]
        cached[moved[:, None], pos[moved]] = new_ids[moved]
    else:
        sel = rows = np.zeros(0, dtype=np.int64)
    return torch.from_numpy(pos), torch.from_numpy(sel), torch.from_numpy(rows)


def _all_columns(a: np.ndarray) -> np.ndarray:
    """``a [N, k]`` bool -> ``[N]``: every column holds (a column loop: faster than ``all(axis=1)`` for small k)."""
    out = a[:, 0].copy()
    for j in range(1, a.shape[1]):
        out &= a[:, j]
    return out


def same_sets_host(ids: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``[N]`` bool: row ``n`` of ``ids [N, k]`` holds the same experts as row ``n`` of ``ref [N, k]`` (in any order;
    a row's experts are distinct), column by column."""
    out = np.ones(ids.shape[0], dtype=bool)
    for j in range(ids.shape[1]):
        found = ids[:, j] == ref[:, 0]
        for slot in range(1, ref.shape[1]):
            found |= ids[:, j] == ref[:, slot]
        out &= found
    return out


def update_pairs(rt: "ReplayRuntime", block, cache: PairCache, flat: torch.Tensor, topk_idx: torch.Tensor
                 ) -> torch.Tensor:
    """Steps 1-3 of the module docstring: match the new top-k ``topk_idx [N, k]`` against the cached experts
    (storing the new ids), compute the newly routed pairs on rows of ``flat [N, D]`` and write each as the newest
    value of its history, with one kept value. -> ``pos [N, k]``: the storage slot of every routed pair."""
    from .routed import match_slots     # routed.py imports this module

    bi = block.index
    N, k = topk_idx.shape
    hist, step = cache.hist, rt.step
    host = not rt.device_path and topk_idx.device.type == "cpu"
    if host:
        pos, sel, rows = match_host(cache.ids, topk_idx)
    else:
        has, pos = match_slots(cache.ids, topk_idx)
        cache.ids.scatter_(1, pos, topk_idx)
        new = ~has.reshape(-1)                                       # pair n*k + j is newly routed
        spos = (pos + (torch.arange(N, device=flat.device) * k).unsqueeze(1)).reshape(-1)   # its storage row
    if host or not _new_device(rt, block, hist, flat, topk_idx.reshape(-1), new, spos, step):
        if not host:
            sel = torch.nonzero(new).squeeze(1)                      # the one host sync (free on a CPU)
            rows = spos.index_select(0, sel)
        m = sel.shape[0]
        if m:
            values = few_pairs(rt, block, flat.index_select(0, sel // k), topk_idx.reshape(-1).index_select(0, sel))
            hist.level(0).index_copy_(0, rows, values.float())
            hist.ts[0].index_fill_(0, rows, step)
            hist.cnt.index_fill_(0, rows, 1.0)
            hist.host_ts = None
        rt.count("expert", bi, m)
        rt.count("gather", bi, 3 * m)
        rt.count("forecast", bi, m * rt.plan.degree)
    return pos


def forecast_branches(rt: "ReplayRuntime", block, cache: PairCache, flat: torch.Tensor, topk_idx: torch.Tensor,
                      topk_w: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """Gate-weighted routed-expert output ``[N, D]`` of a step whose experts are all ``never`` (see the
    module docstring); ``base``: a float32 ``[N, D]`` it is added to in place (the shared expert's forecast)."""
    pos = update_pairs(rt, block, cache, flat, topk_idx)
    N, k = topk_idx.shape
    rt.note_reused("routed-expert", block.index, cache)
    rt.count("forecast", block.index, N * k * rt.plan.degree)
    gates = torch.zeros_like(topk_w).scatter_(1, pos, topk_w)       # current gates, storage order
    return cache.hist.combine(rt.step, gates, out=base).to(flat.dtype)


def routing_ready(rt: "ReplayRuntime", block, st: BlockState, rows: int) -> bool:
    """Whether ``block``'s routing-aware step can run (:func:`routing_forecast`): its whole-MoE, branch and shared
    caches hold ``rows`` rows and the routed experts of the last refresh are known (host flags only)."""
    pairs = st.experts
    return (_cached(st.moe, rows) and pairs.valid and pairs.hist is not None and pairs.age is None
            and pairs.ref_ids is not None and pairs.ref_ids.shape[0] == rows and pairs.ids.shape == pairs.ref_ids.shape
            and (block.moe.shared_experts is None or _cached(st.shared, rows)))


def moved_tokens(ids: torch.Tensor, ref_ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the token's routed experts ``ids [N, k]`` are not the set ``ref_ids [N, k]`` (the last
    refresh's; compared as sets, so a slot permutation is no change)."""
    return ~(ids.unsqueeze(2) == ref_ids.unsqueeze(1)).any(dim=2).all(dim=1)


def routing_forecast(rt: "ReplayRuntime", block, st: BlockState, flat: torch.Tensor, topk_idx: torch.Tensor,
                     topk_w: torch.Tensor) -> torch.Tensor:
    """The MoE output ``[N, D]`` float32 (routed and shared experts, before ``gate_mlp``) of a routing-aware forecast
    step (the schedule's ``moe`` rule ``routing``): the newly routed pairs are computed and stored as at the branch
    level (:func:`update_pairs`); a token whose routed experts are the set it had at the last refresh gets the
    forecast of its whole MoE output (per token, as at the token level: the routing gates as they were at the
    refreshes); a token whose set changed (*moved*) gets its branches forecast and combined with the current gates
    plus the shared expert's forecast, as at the branch level.

    Host path: the moved tokens are found on the host and only their rows are gathered, combined and scattered
    (``c`` moved tokens: ``c (k + 1)`` forecast rows). Device path: every token's branch combination is formed and
    the moved ones picked by mask (no host sync; ``N (k + 1)`` forecast rows counted)."""
    bi = block.index
    N, k = topk_idx.shape
    D = flat.shape[1]
    cache, step, degree = st.experts, rt.step, rt.plan.degree
    pos = update_pairs(rt, block, cache, flat, topk_idx)
    gates = torch.zeros_like(topk_w).scatter_(1, pos, topk_w).float()      # current gates, storage order
    whole = st.moe.hist
    out = whole.forecast(step)
    if whole.degree == 0 or whole.uniform == 1:      # the kept value itself (History.forecast): never write into it
        out = out.clone()
    rt.note_reused("moe", bi, st.moe)
    rt.count("forecast", bi, N * degree)
    shared = st.shared if block.moe.shared_experts is not None else None
    units = k + (shared is not None)
    if not rt.device_path and flat.device.type == "cpu":
        moved = np.flatnonzero(~same_sets_host(cache.ids.numpy(), cache.ref_ids.numpy()))
        if moved.size:
            rows = torch.from_numpy(moved)
            sub = _rows_forecast(shared.hist, rows, step) if shared is not None \
                else torch.zeros(moved.size, D, device=flat.device)
            lag = [1.0] if cache.hist.degree == 0 else cache.hist.weights(step)
            g = gates.index_select(0, rows)
            for j, lj in enumerate(lag):
                vals = cache.hist.level(j).view(N, k, D).index_select(0, rows)               # [c, k, D]
                ww = g * (lj.view(N, k).index_select(0, rows) if isinstance(lj, torch.Tensor) and lj.numel() > 1
                          else lj)
                for slot in range(k):
                    sub.addcmul_(vals[:, slot], ww[:, slot:slot + 1])
            out.index_copy_(0, rows, sub)
            rt.count("gather", bi, moved.size * (units + 1))
        rt.count("forecast", bi, moved.size * units * degree)
    else:
        moved = moved_tokens(cache.ids, cache.ref_ids)
        base = shared_forecast(rt, bi, shared, count=False) if shared is not None else None
        out = torch.where(moved.unsqueeze(1), cache.hist.combine(step, gates, out=base), out)
        rt.count("forecast", bi, N * units * degree)
    rt.note_reused("routed-expert", bi, cache)
    if shared is not None:
        rt.note_reused("shared", bi, shared)
    return out


def _rows_forecast(hist, rows: torch.Tensor, step) -> torch.Tensor:
    """The forecast of rows ``rows [c]`` of ``hist`` at ``step`` -> ``[c, D]`` float32, a tensor of its own."""
    out = None
    for j, w in enumerate([1.0] if hist.degree == 0 else hist.weights(step)):
        v = hist.level(j).index_select(0, rows)
        if isinstance(w, torch.Tensor) and w.dim():
            w = w.index_select(0, rows).unsqueeze(1)
        out = v * w if out is None else out.add_(v * w)
    return out


def _new_device(rt: "ReplayRuntime", block, hist, flat: torch.Tensor, flat_idx: torch.Tensor, new: torch.Tensor,
                spos: torch.Tensor, step) -> bool:
    """Device path of steps 2-3: the new pairs sorted first (by expert) into the fixed ``N*k`` buffer, grouped
    GEMMs up to the device-side count, their values merged into the history by mask; no host sync. False
    when the experts cannot be stacked (the caller takes the host path)."""
    bi, k = block.index, block.moe.top_k
    M = new.shape[0]
    E = block.moe.num_experts
    order = torch.argsort((~new).to(torch.int64) * E + flat_idx, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat_idx, new.to(torch.int64))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    y = grouped_prefix(block, flat.index_select(0, order // k), offs)
    if y is None:
        return False
    mask = torch.empty_like(new).index_copy_(0, spos, new)              # storage order
    level0 = hist.level(0)
    level0.copy_(torch.where(mask.unsqueeze(-1), torch.empty_like(level0).index_copy_(0, spos.index_select(0, order),
                                                                                      y.float()), level0))
    hist.ts[0].masked_fill_(mask, step)
    hist.cnt.masked_fill_(mask, 1.0)
    hist.host_ts = None
    n = offs[-1]
    rt.count("expert", bi, n)
    rt.count("gather", bi, 3 * M)
    rt.count("forecast", bi, M * rt.plan.degree)
    return True


def block_ready(rt: "ReplayRuntime", block, st: BlockState, rows: int) -> bool:
    """Whether ``block`` runs whole as a lean branch forecast step (:func:`branch_block`): a DiT-MoE block
    whose attention and shared expert are reused whole and untracked, whose MoE is routed (not reused per
    token), whose routed experts are all ``never`` (:func:`lean_ready`), with caches of ``rows`` rows; or a
    routing-aware step (``moe`` rule ``routing``, :func:`routing_ready`) (host flags only)."""
    if not rt.lean or not isinstance(block, DiTMoEBlock):
        return False
    bi, rule = block.index, rt.rule(block.index)
    plan = rt.plan
    if rule.attn.mode != "reuse" or plan.track_attn[bi] or plan.track_moe[bi] or not _cached(st.attn, rows):
        return False
    if rule.moe.mode == "routing":
        return routing_ready(rt, block, st, rows)
    if rule.moe.mode != "always" or plan.moe_token_level[bi]:
        return False
    if block.moe.shared_experts is not None and (rule.shared.mode != "reuse" or not _cached(st.shared, rows)):
        return False
    return lean_ready(rt, st.experts, rt.kind.expert_summary[bi]) and st.experts.ids is not None \
        and st.experts.ids.shape[0] == rows


def _cached(cache: RowCache, rows: int) -> bool:
    return cache.valid and cache.hist is not None and cache.hist.rows == rows


def shared_forecast(rt: "ReplayRuntime", bi: int, cache: RowCache, count: bool = True) -> torch.Tensor:
    """The shared expert's forecast ``[N, D]`` float32, a tensor of its own (the caller adds to it in place),
    counted (``count``) as :func:`.token.run_token_unit` counts a reused unit."""
    hist = cache.hist
    out = hist.forecast(rt.step)
    if hist.degree == 0 or hist.uniform == 1:     # the forecast is the kept value itself (History.forecast):
        out = out.clone()                          # never add into the history
    if count:
        rt.note_reused("shared", bi, cache)
        rt.count("forecast", bi, hist.rows * rt.plan.degree)
    return out


def branch_block(rt: "ReplayRuntime", block, st: BlockState, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One block of a lean branch forecast step (:func:`block_ready`), ``x [B, T, D]``, ``c [B, D]`` -> ``[B, T, D]``.

    The arithmetic of :meth:`DiTMoEBlock.forward` with the reused attention, the routed experts of
    :func:`forecast_branches` and the reused shared expert, in fewer passes over ``[N, D]``: no ``norm1`` or
    attention modulation (attention is reused whole) and only the four adaLN chunks the block uses, each gated
    residual add one ``addcmul``, and the
    branches' gate-weighted forecasts added straight into the shared expert's forecast. The counters are
    those of the block-by-block path."""
    bi = block.index
    B, T, D = x.shape
    N, k = B * T, block.moe.top_k
    proj = block.adaLN_modulation[-1]           # only the four chunks this block uses: rows 2D..6D
    gate_msa, shift_mlp, scale_mlp, gate_mlp = F.linear(block.adaLN_modulation[0](c), proj.weight[2 * D:],
                                                        proj.bias[2 * D:]).chunk(4, dim=1)
    attn = reused_attention(rt, block, st, x.shape, x.dtype)
    x = torch.addcmul(x, gate_msa.unsqueeze(1), attn)
    flat = modulate(block.norm2(x), shift_mlp, scale_mlp).reshape(N, D)
    rt.count("pairs", bi, N * k)
    topk_idx, topk_w = rt.route(block, flat)
    rt.count("router", bi, N)
    if rt.rule(bi).moe.mode == "routing":
        moe = routing_forecast(rt, block, st, flat, topk_idx, topk_w)
    else:
        base = shared_forecast(rt, bi, st.shared) if block.moe.shared_experts is not None else None
        moe = forecast_branches(rt, block, st.experts, flat, topk_idx, topk_w, base=base)
    return torch.addcmul(x, gate_mlp.unsqueeze(1), moe.view(B, T, D).to(x.dtype))
