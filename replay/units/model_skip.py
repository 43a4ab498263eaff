"""Whole-model skip (TeaCache-like ``model_skip``, or ``model: reuse`` steps): run all blocks or add
the cached residual of the last computed step.

The adaptive rule's decision is a host decision by nature (whether to run the blocks at all): it reads
one number per forward (the rescaled change of block 0's modulated input). Schedules without a
whole-model skip never get here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import ReplayRuntime

EPS = 1e-12


def run_with_model_skip(rt: "ReplayRuntime", model, x: torch.Tensor, c: torch.Tensor,
                        blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x [B, T, D]`` through all blocks (``blocks(x)``) or ``x`` plus the cached residual."""
    cs, schedule = rt.context, rt.schedule
    mode = rt.kind.model
    skip = False
    if schedule.model_skip is not None:  # change indicator, tracked on every forward (computed or not)
        m = model.blocks[0].attention_input(x, c)
        prev, cs.model_prev = cs.model_prev, m
        if mode == "adaptive" and prev is not None and prev.shape == m.shape and cs.residual is not None \
                and cs.residual.shape == x.shape:
            r = float(((m - prev).abs().mean() / (prev.abs().mean() + EPS)).item())
            cs.model_acc += schedule.model_skip.rescale(r)
            skip = cs.model_acc < schedule.model_skip.threshold
    if mode == "reuse":
        skip = cs.residual is not None and cs.residual.shape == x.shape
    if skip:
        N = x.shape[0] * x.shape[1]
        rt.count_skipped_forward(N, N * model.config.top_k, len(model.blocks))
        rt.note_reused("whole-model residual", -1, cs.residual)
        return x + cs.residual
    cs.model_acc = 0.0
    out = blocks(x)
    if cs.residual is None or cs.residual.shape != x.shape:
        cs.residual = torch.empty_like(x)
    torch.sub(out, x, out=cs.residual)
    return out
