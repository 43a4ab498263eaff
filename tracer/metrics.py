"""Change metrics between a unit's output now and ``lag`` steps back, computed on the model's device.

Conventions are those of :mod:`moeca.tracer.schema`: ``rel_l2 = ||a - b|| / (||b|| + 1e-12)`` and
``cos`` from the law of cosines, clamped to [-1, 1] (0 when either vector is zero). Missing values
are NaN here; the writer turns NaN into Parquet nulls.
"""
from __future__ import annotations

import torch

EPS = 1e-12


def rel_and_cos(cur: torch.Tensor, cur_norm: torch.Tensor, prev: torch.Tensor,
                prev_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cur, prev [..., D]`` (broadcasting) with their norms ``[...]`` -> ``(rel_l2 [...], cos [...])``.

    One subtraction and one norm pass: ``||a-b||`` is taken directly (no cancellation for small
    changes) and the cosine follows from ``||a-b||^2 = |a|^2 + |b|^2 - 2|a||b| cos``.
    """
    return rel_and_cos_from_norms(torch.linalg.vector_norm(cur - prev, dim=-1), cur_norm, prev_norm)


def ring_diff_norms(cur: torch.Tensor, ring: torch.Tensor, scratch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``||cur - ring[w]||`` over the last axis for every ring slot ``w``, without large temporaries.

    cur ``[..., D]``, ring ``[W, ..., D]``, scratch like ``cur`` (reused buffer), out ``[W, ...]``.
    """
    for w in range(ring.shape[0]):
        torch.sub(cur, ring[w], out=scratch)
        torch.linalg.vector_norm(scratch, dim=-1, out=out[w])
    return out


def rel_and_cos_from_norms(diff: torch.Tensor, cur_norm: torch.Tensor,
                           prev_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`rel_and_cos` given ``diff = ||a - b||`` and both norms (all broadcastable)."""
    rel = diff / (prev_norm + EPS)
    denom = 2 * cur_norm * prev_norm
    cos = (cur_norm * cur_norm + prev_norm * prev_norm - diff * diff) / denom.clamp_min(1e-30)
    cos = torch.where(denom > 0, cos.clamp(-1.0, 1.0), torch.zeros_like(cos))
    return rel, cos


def match_slots(ids_now: torch.Tensor, ids_then: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where was each current (row, expert) pair at an earlier step?

    ids_now, ids_then ``[..., N, k]`` expert ids (distinct within a row; leading dims broadcast) ->
    ``(routed [..., N, k] bool, slot_then [..., N, k] int64)``: ``routed`` says the pair was routed then, ``slot_then`` is its slot
    then (0 where not routed).
    """
    match = ids_now.unsqueeze(-1) == ids_then.unsqueeze(-2)                     # [N, k, k]
    routed = match.any(dim=-1)
    slots = torch.arange(ids_then.shape[-1], device=ids_then.device)
    slot_then = (match.to(torch.int64) * slots).sum(dim=-1)
    return routed, slot_then
