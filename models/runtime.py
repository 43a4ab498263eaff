"""The runtime seams of a DiT-MoE forward (DESIGN section 1).

The model calls into a :class:`Runtime` at fixed points; the default computes everything. A tracer or
a cache replay is a subclass that overrides some seams. Runtimes never patch model classes; a model
holds its runtime and ``DiTMoE.use_runtime`` swaps it for the duration of a ``with`` block.

Shapes: ``B`` batch, ``T`` tokens, ``D`` hidden size, ``N = B*T`` flattened rows, ``k`` top-k.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .dispatch import PATHS, DispatchPath, expert_forward, run_routed

if TYPE_CHECKING:  # pragma: no cover
    from .dit_moe import DiTMoE, DiTMoEBlock


@dataclass(frozen=True)
class ForwardContext:
    """Where a forward call sits in a sampling run.

    step: 0-based index of the sampling step (0 is the noisiest); num_steps: steps in the run;
    cfg_branch: ``"batched"`` (one ``[cond; uncond]`` call), ``"cond"``, ``"uncond"`` (two separate
    calls) or ``"none"`` (no guidance). Caching runtimes keep separate state per ``cfg_branch``.
    """

    step: int
    num_steps: int
    cfg_branch: str = "none"


class Runtime:
    """Computes every seam in full. Subclasses override seams to record or to reuse work.

    dispatch: the routed-expert path (:mod:`~moeca.models.dispatch`): ``"auto"`` (the fastest for the
    device), ``"loop"`` or ``"grouped"`` (the device path; forced on CPU tensors to test it).
    """

    dispatch: DispatchPath = "auto"

    def __init__(self, dispatch: DispatchPath = "auto"):
        if dispatch not in PATHS:
            raise ValueError(f"Runtime(dispatch={dispatch!r}): use one of {', '.join(PATHS)}")
        self.dispatch = dispatch

    def prepare_forward(self, model: "DiTMoE", ctx: ForwardContext | None, x: torch.Tensor) -> None:
        """Called once per forward before anything else and *outside* a compiled forward (``--compile``
        compiles :meth:`DiTMoE.forward_core` only): host-side decisions for this call. A caching runtime
        reads the step number here and nowhere inside the forward, so a compiled forward is specialised
        on the kind of step (its rules), not on the step number. ``x`` is the model input ``[B, C, H, W]``."""

    def begin_forward(self, model: "DiTMoE", ctx: ForwardContext | None, x_tokens: torch.Tensor) -> None:
        """Called once per forward before the blocks (inside a compiled forward); ``x_tokens`` is ``[B, T, D]``."""

    def end_forward(self, model: "DiTMoE", ctx: ForwardContext | None) -> None:
        """Called once per forward after the final layer (inside a compiled forward)."""

    def finish_forward(self, model: "DiTMoE", ctx: ForwardContext | None, out: torch.Tensor) -> None:
        """Called once per forward with the model output, outside a compiled forward (host-side checks and
        bookkeeping)."""

    def reset(self) -> None:
        """Drop all per-run state (caches, traces in flight). Called by samplers before a run."""

    def run_blocks(self, model: "DiTMoE", x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """All transformer blocks: ``x [B, T, D]``, condition ``c [B, D]`` -> ``[B, T, D]``."""
        for block in model.blocks:
            x = block(x, c, self)
        return x

    def attention(self, block: "DiTMoEBlock", x_mod: torch.Tensor) -> torch.Tensor:
        """Self-attention on the modulated input ``[B, T, D]`` -> ``[B, T, D]`` (before ``gate_msa``)."""
        return block.attn(x_mod)

    def route(self, block: "DiTMoEBlock", h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate on rows ``h [N, D]`` -> ``(topk_idx [N, k] int64, topk_weight [N, k])``, raw softmax."""
        return block.moe.gate(h)

    def expert(self, block: "DiTMoEBlock", e: int, h_rows: torch.Tensor) -> torch.Tensor:
        """Routed expert ``e`` on rows ``[n, D]`` -> unweighted output ``[n, D]``. A subclass that overrides
        this seam sees every computed row: the dispatch then calls it once per expert with rows."""
        return expert_forward(block, e, h_rows)

    def shared_expert(self, block: "DiTMoEBlock", h: torch.Tensor) -> torch.Tensor:
        """Shared expert on rows ``[N, D]`` -> ``[N, D]``."""
        return block.moe.shared_experts(h)

    def moe(self, block: "DiTMoEBlock", h: torch.Tensor) -> torch.Tensor:
        """MoE on the modulated input ``[B, T, D]`` -> ``[B, T, D]`` (before ``gate_mlp``).

        route -> routed-expert dispatch (unweighted rows per (token, slot)) -> combine with the
        current gate weights -> plus the shared expert.
        """
        B, T, D = h.shape
        flat = h.reshape(B * T, D)
        topk_idx, topk_weight = self.route(block, flat)
        slot_out = self.routed_experts(block, flat, topk_idx)
        out = combine_slots(slot_out, topk_weight)
        if block.moe.shared_experts is not None:
            out = out + self.shared_expert(block, flat)
        return out.view(B, T, D)

    def routed_experts(self, block: "DiTMoEBlock", flat: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """Each expert runs once on exactly the rows routed to it (:func:`~moeca.models.dispatch.run_routed`).

        flat ``[N, D]``, topk_idx ``[N, k]`` -> unweighted outputs per (row, slot) ``[N, k, D]``.
        """
        seam = None if type(self).expert is Runtime.expert else functools.partial(self.expert, block)
        return run_routed(block, flat, topk_idx, path=self.dispatch, expert=seam)


def combine_slots(slot_out: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum over slots: ``[N, k, D]`` x ``[N, k]`` -> ``[N, D]``."""
    return (slot_out * topk_weight.unsqueeze(-1).to(slot_out.dtype)).sum(dim=1)


DEFAULT_RUNTIME = Runtime()
