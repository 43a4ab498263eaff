"""The attention unit: compute, reuse (plain or forecast) or recompute some query tokens per sample.

Shapes: ``x_mod [B, T, D]`` -> ``[B, T, D]``. A ``fraction f`` rule recomputes the ``ceil(f T)``
highest-scoring query tokens of every sample (K/V projections of all tokens); ``threshold x`` recomputes,
in every sample, as many tokens as the sample with the most tokens above ``x`` has (the host path asks
the host for that count; the device path computes full attention and keeps the same tokens, ranked on
the device).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..partial_attention import partial_attention
from ..state import BlockState
from .selection import score_of

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import ReplayRuntime


def run_attention(rt: "ReplayRuntime", block, st: BlockState, x_mod: torch.Tensor) -> torch.Tensor:
    bi = block.index
    rule = rt.rule(bi).attn
    B, T, D = x_mod.shape
    N = B * T
    rt.count("tokens", bi, N)
    track = rt.plan.track_attn[bi]
    drift = st.attn_drift.update(x_mod) if track else None
    cache, step, degree = st.attn, rt.step, rt.plan.degree
    if rule.mode == "always" or not cache.valid:
        out = block.attn(x_mod)
        rt.count("attn_q", bi, N)
        rt.count("attn_kv", bi, N)
        if rt.plan.attn_reused[bi]:
            cache.ensure(degree, N, D, track, x_mod.device, rt.plan.forecast_kind)
            cache.hist.push_all(out.reshape(N, D), step)
            cache.computed(None)
            cache.valid = True
            rt.count("forecast", bi, N * degree)
        return out
    cache.bump(drift)
    score = score_of(cache, rt.schedule.score("attn"), N, x_mod.device).view(B, T)
    n = 0
    if rule.mode == "fraction":
        n = min(T, math.ceil(rule.value * T))
    elif rule.mode == "threshold" and rt.device_path:
        per_sample = (score > rule.value).sum(dim=1).max()                       # device scalar
        rank = torch.argsort(torch.argsort(score, dim=1, descending=True, stable=True), dim=1)
        keep = (rank < per_sample).reshape(N)
        cache.hist.push_where(keep, block.attn(x_mod).reshape(N, D), step)
        if cache.age is not None:
            cache.age.masked_fill_(keep, 0.0)
            cache.acc.masked_fill_(keep, 0.0)
        rt.count("attn_q", bi, N)
        rt.count("attn_kv", bi, N)
        rt.count("padded", bi, N - keep.sum())
        rt.count("forecast", bi, 2 * N * degree)
        rt.note_reused("attention", bi, cache)
        return cache.hist.forecast(step).to(x_mod.dtype).view(B, T, D)
    elif rule.mode == "threshold":
        n = int((score > rule.value).sum(dim=1).max())
    if n:
        idx = torch.topk(score, n, dim=1).indices                                  # [B, n]
        sub = partial_attention(block.attn, x_mod, idx)                            # [B, n, D]
        rows = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * T).reshape(-1)
        cache.hist.push_rows(rows, sub.reshape(-1, D), step)
        cache.computed(rows)
        rt.count("attn_q", bi, B * n)
        rt.count("attn_kv", bi, N)
        rt.count("gather", bi, 2 * B * n)
        rt.count("forecast", bi, B * n * degree)
    if n < T:
        rt.note_reused("attention", bi, cache)
    rt.count("forecast", bi, N * degree)
    return cache.hist.forecast(step).to(x_mod.dtype).view(B, T, D)


def reused_attention(rt: "ReplayRuntime", block, st: BlockState, shape: torch.Size, dtype: torch.dtype
                     ) -> torch.Tensor | None:
    """The cached attention output ``[B, T, D]`` when the rule reuses it whole and its input is not
    tracked (the block may then skip ``norm1`` and the modulation), else None."""
    bi = block.index
    cache = st.attn
    if rt.plan.track_attn[bi] or not cache.valid or rt.rule(bi).attn.mode != "reuse" \
            or cache.hist.rows != shape[0] * shape[1]:
        return None
    rt.count("tokens", bi, shape[0] * shape[1])
    rt.count("forecast", bi, shape[0] * shape[1] * rt.plan.degree)
    rt.note_reused("attention", bi, cache)
    return cache.hist.forecast(rt.step).to(dtype).view(shape)
