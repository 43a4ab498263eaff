"""The model protocol the tracer and the replay engine share (DESIGN section 1b).

A model family presents each of its MoE blocks as a :class:`MoEBlock`: an ``index`` (its position
among the model's MoE blocks: the ``block`` of traces and schedules) and a ``moe`` layer
(:class:`MoELayer`: router, routed experts, shared expert). The native DiT-MoE blocks
(:class:`~moeca.models.dit_moe.DiTMoEBlock`) are such blocks as they are and call the runtime's seams
from their own forward; a foreign family (``moeca.integrations.diffusers`` for HiDream-I1) wraps its
modules in small adapters and calls the same runtime functions from hooks. The routed-expert
dispatch (:mod:`.dispatch`), the runtime's ``route``/``expert``/``shared_expert`` seams and the
tracer's per-block recording work on either.

Shapes: ``N`` rows (tokens of every batch row), ``D`` hidden size, ``k`` slots per row.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class MoELayer(Protocol):
    """Router plus experts. ``gate(h [N, D]) -> (topk_idx [N, k] int64, topk_weight [N, k])`` (raw
    softmax probabilities, in the slot order the router gives: DiT-MoE sorts by weight, HiDream does
    not, so consumers key branches by expert id); ``experts`` the routed experts (bias-free SwiGLU
    modules stack into one dispatch); ``shared_experts`` a dense expert on every row or None;
    ``expert_stack`` the dispatch's stacked weights (set by the dispatch)."""

    num_experts: int
    top_k: int
    experts: nn.ModuleList
    shared_experts: nn.Module | None
    expert_stack: object

    def gate(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class MoEBlock(Protocol):
    """One MoE block of a model family: ``index`` (0-based among the model's MoE blocks) and ``moe``."""

    index: int
    moe: MoELayer
