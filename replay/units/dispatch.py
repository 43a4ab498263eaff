"""Device-path dispatch of the pairs a replay step selects (full compute goes through
:mod:`moeca.models.dispatch`, the one dispatch of every runtime).

A device-path step must not ask the host how many pairs it computes, so the selected pairs are sorted
first (grouped by expert) into a buffer of fixed size ``M = N*k`` and run by grouped GEMMs with
device-side end offsets over the layer's stacked weights
(:func:`moeca.models.dispatch.expert_stack`); rows past the last offset are not computed and their
output is ignored. No padding: exactly the selected pairs run.
"""
from __future__ import annotations

import torch

from moeca.models.dispatch import expert_stack, grouped_swiglu


def grouped_prefix(block, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
    """Expert ``g`` on rows ``offs[g-1]:offs[g]`` of ``rows [M, D]`` -> ``[M, D]`` (rows past ``offs[-1]``
    undefined); ``offs [E]`` int32 cumulative group ends on the device
    (:func:`moeca.models.dispatch.grouped_swiglu`). None when the layer's experts cannot be stacked (not
    bias-free SwiGLU): the caller takes the host path."""
    stack = expert_stack(block.moe)
    return None if stack is None else grouped_swiglu(stack, rows, offs)
