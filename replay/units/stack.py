"""The whole block stack forecast at once: a step whose every block reuses attention and the whole MoE output.

On such a step (TaylorSeer's and FORA's cached steps, MoECa's token-level forecast steps) no block computes
anything from its input: block ``b`` adds ``gate_msa_b * A_b(s) + gate_mlp_b * M_b(s)`` to the residual
stream, where ``A_b(s)`` / ``M_b(s)`` are the forecasts of its cached attention / MoE outputs (``[N, D]``)
and the gates ``[B, D]`` come from the conditioning ``c``. So the stack's output is::

    x + sum_b (gate_msa_b * A_b(s) + gate_mlp_b * M_b(s))

This computes exactly that, without the dead work of the block-by-block path (``norm2`` and the modulation
of the MoE input): each block's adaLN projection for its gates, one forecast per unit accumulated in
float32 into the residual. The sum is the block-by-block path's up to floating-point summation order (the
gates and forecasts are the same values).
Counters and the finiteness bookkeeping record what the block-by-block path records.
Shapes: ``x [B, T, D]``, ``c [B, D]`` -> ``[B, T, D]`` in ``x``'s dtype.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moeca.models.dit_moe import DiTMoEBlock

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import ReplayRuntime


def stack_ready(rt: "ReplayRuntime", model, rows: int) -> bool:
    """Whether every block holds a valid cached attention and MoE output of ``rows`` rows (host flags only)."""
    if not rt.kind.forecast_all:
        return False
    for block, st in zip(model.blocks, rt.context.blocks):
        if not isinstance(block, DiTMoEBlock):
            return False
        for cache in (st.attn, st.moe):
            if not cache.valid or cache.hist is None or cache.hist.rows != rows:
                return False
    return True


def forecast_stack(rt: "ReplayRuntime", model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The block stack's output on a step that forecasts every unit of every block (see the module docstring)."""
    B, T, D = x.shape
    N = B * T
    step, degree = rt.step, rt.plan.degree
    acc = x.to(torch.float32, copy=True)
    for block, st in zip(model.blocks, rt.context.blocks):
        bi = block.index
        _, _, gate_msa, _, _, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        for name, cache, gate in (("attention", st.attn, gate_msa), ("moe", st.moe, gate_mlp)):
            acc.addcmul_(cache.hist.forecast(step).view(B, T, D), gate.float().unsqueeze(1))
            rt.note_reused(name, bi, cache)
            rt.count("forecast", bi, N * degree)
        rt.count("tokens", bi, N)
        rt.count("pairs", bi, N * block.moe.top_k)
        st.experts.valid = st.shared.valid = False   # as after any token-level reuse of the whole MoE output
    return acc.to(x.dtype)
