"""Whole-model skips: ``model: reuse`` steps and the adaptive ``model_skip`` rules of the schedule.

- ``model: reuse`` (MagCache's static skips): add the residual of all blocks cached at the last computed
  step to the input.
- ``modulated_input`` (TeaCache): per forward, the rescaled relative L1 change of block 0's modulated
  input against the previous forward accumulates since the last computed step; below the threshold the
  blocks are skipped and the cached residual added.
- ``first_blocks_residual`` (First-Block Cache / DBCache): the first ``Fn`` blocks always run; their
  residual's relative L1 change against the one of the last computed forward decides whether the middle
  blocks run or their cached residual is added; the last ``Bn`` blocks always run.

An adaptive decision is a host decision by nature (whether to run the blocks at all): it reads one
number per forward. Schedules without a whole-model skip never get here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import ReplayRuntime

EPS = 1e-12


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|current - previous| / mean|previous|`` over all elements (one host sync)."""
    return float(((current - previous).abs().mean() / (previous.abs().mean() + EPS)).item())


def run_with_model_skip(rt: "ReplayRuntime", model, x: torch.Tensor, c: torch.Tensor,
                        blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x [B, T, D]`` through all blocks (``blocks(x)``), or with the cached residual in their place."""
    skip_rule = rt.schedule.model_skip
    if skip_rule is not None and skip_rule.indicator == "first_blocks_residual":
        return _first_blocks(rt, model, x, c)
    cs = rt.context
    mode = rt.kind.model
    skip = False
    if skip_rule is not None:  # change indicator, tracked on every forward (computed or not)
        m = model.blocks[0].attention_input(x, c)
        prev, cs.model_prev = cs.model_prev, m
        if mode == "adaptive" and prev is not None and prev.shape == m.shape and cs.residual is not None \
                and cs.residual.shape == x.shape:
            cs.model_acc += skip_rule.rescale(relative_l1(m, prev))
            skip = cs.model_acc < skip_rule.threshold
    if mode == "reuse":
        skip = cs.residual is not None and cs.residual.shape == x.shape
    if skip:
        N = x.shape[0] * x.shape[1]
        rt.count_skipped_forward(N, N * model.config.top_k, range(len(model.blocks)))
        rt.note_reused("whole-model residual", -1, cs.residual)
        return x + cs.residual
    cs.model_acc = 0.0
    out = blocks(x)
    _store_residual(cs, out, x)
    return out


def _first_blocks(rt: "ReplayRuntime", model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """First-Block Cache: ``model_prev`` holds the head residual and ``residual`` the middle blocks'
    residual of the last forward that ran every block."""
    cs, rule = rt.context, rt.schedule.model_skip
    depth = len(model.blocks)
    head_end, tail_start = rule.first_blocks, depth - rule.last_blocks
    h = x
    for block in model.blocks[:head_end]:
        h = block(h, c, rt)
    head = h - x
    prev = cs.model_prev
    skip = rt.kind.model == "adaptive" and prev is not None and prev.shape == head.shape \
        and cs.residual is not None and cs.residual.shape == h.shape \
        and relative_l1(head, prev) < rule.threshold
    if skip:
        N = x.shape[0] * x.shape[1]
        rt.count_skipped_forward(N, N * model.config.top_k, range(head_end, tail_start))
        rt.note_reused("middle-blocks residual", -1, cs.residual)
        h = h + cs.residual
    else:
        mid_in = h
        for block in model.blocks[head_end:tail_start]:
            h = block(h, c, rt)
        _store_residual(cs, h, mid_in)
        cs.model_prev = head
    for block in model.blocks[tail_start:]:
        h = block(h, c, rt)
    return h


def _store_residual(cs, out: torch.Tensor, inp: torch.Tensor) -> None:
    """``cs.residual = out - inp`` in a buffer kept across steps."""
    if cs.residual is None or cs.residual.shape != inp.shape:
        cs.residual = torch.empty_like(inp)
    torch.sub(out, inp, out=cs.residual)
