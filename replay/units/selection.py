"""Token selection hooks: which cached rows a scored rule recomputes (``Schedule.token_selection``).

- ``moeca_score``: the online score ``drift_weight * accumulated drift + staleness_weight * age``, the
  ``ceil(f * N)`` highest rows of the batch (``fraction f``) or the rows above ``x`` (``threshold x``);
- ``toca`` (whole-MoE ``fraction`` rules): DiT-ToCa's ``cache_type similarity`` score, the published
  option that needs no attention map (its recommended ``attention`` score s1 needs the map SDPA hides):
  per sample ``normalize_L2(1 - cos(x, c))`` over the tokens, ``x`` the unit's current input and ``c`` its
  cached output (the value last computed for the token), plus ``soft_fresh_weight * age / fresh_threshold``
  (s3), ToCa's spatial bonus (s4, :func:`spatial_bonus`), the ``int(f * T)`` best tokens. This is the one
  home of ToCa's scoring.

The host path returns the selected rows; the device path never asks the host for a data-dependent
count: a ``threshold`` rule returns a mask over all rows instead (the unit computes every row and keeps
the selected ones, counted as run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeca.policy.schedule import Rule, ScoreConfig, TokenSelection

from ..state import RowCache


@dataclass(frozen=True)
class Selected:
    """Rows to recompute: ``rows [m]`` (static or host-known ``m``), or ``mask [R]`` (device path), or
    neither (reuse every row)."""

    rows: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def nothing(self) -> bool:
        return self.rows is None and self.mask is None


def score_of(cache: RowCache, cfg: ScoreConfig, rows: int, device: torch.device) -> torch.Tensor:
    """The online score ``[R]`` float32 of a cache's rows (zeros when the unit is not tracked)."""
    if cache.age is None:
        return torch.zeros(rows, device=device)
    return cache.acc * cfg.drift_weight + cache.age * cfg.staleness_weight


def select_rows(cache: RowCache, rule: Rule, cfg: ScoreConfig, selection: TokenSelection, batch: int,
                inputs: torch.Tensor, device_path: bool, kind: str) -> Selected:
    """Rows of a per-token unit to recompute under ``never`` / ``fraction`` / ``threshold`` (``inputs [R, D]``
    the unit's current input rows, ``R = batch * T``; ``kind`` the unit kind, ``moe`` for the whole-MoE rule)."""
    if rule.mode == "reuse":
        return Selected()
    rows, device = inputs.shape[0], inputs.device
    if rule.mode == "fraction" and selection.kind == "toca" and kind == "moe" and cache.age is not None:
        return _toca(cache, rule.value, selection, batch, inputs)
    score = score_of(cache, cfg, rows, device)
    if rule.mode == "fraction":
        m = min(rows, math.ceil(rule.value * rows))
        return Selected(rows=torch.topk(score, m).indices) if m else Selected()
    above = score > rule.value
    if device_path:
        return Selected(mask=above)
    picked = torch.nonzero(above).squeeze(1)
    return Selected(rows=picked) if picked.numel() else Selected()


def spatial_bonus(score: torch.Tensor, bonus: float, patch: int) -> torch.Tensor:
    """ToCa's s4: in every ``patch x patch`` group of the square token grid the best token gets ``+bonus x``
    its score. ``score [B, T]`` -> ``[B, T]``; unchanged when ``bonus == 0`` or the grid does not tile
    (non-square ``T``, or a side not divisible by ``patch``)."""
    B, T = score.shape
    side = int(round(math.sqrt(T)))
    if bonus == 0 or patch <= 1 or side * side != T or side % patch:
        return score
    g = side // patch
    blocks = score.view(B, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(B, g * g, patch * patch)
    best, idx = blocks.max(dim=-1, keepdim=True)
    blocks = blocks + torch.zeros_like(blocks).scatter_(-1, idx, 1.0) * best * bonus
    return blocks.view(B, g, g, patch, patch).permute(0, 1, 3, 2, 4).reshape(B, T)


def _toca(cache: RowCache, fraction: float, sel: TokenSelection, batch: int, inputs: torch.Tensor) -> Selected:
    """ToCa's selection (module docstring): ``inputs [batch * T, D]``, the cached outputs ``cache.hist.level(0)``."""
    T = inputs.shape[0] // batch
    count = int(round(fraction * T))
    if count == 0:
        return Selected()
    cos = F.cosine_similarity(inputs.float(), cache.hist.level(0), dim=-1)
    score = F.normalize((1 - cos).view(batch, T), dim=-1, p=2)
    score = score + sel.soft_fresh_weight * cache.age.view(batch, T) / sel.fresh_threshold
    score = spatial_bonus(score, sel.spatial_bonus, sel.spatial_grid)
    idx = score.argsort(dim=-1, descending=True)[:, :count]
    return Selected(rows=(idx + torch.arange(batch, device=idx.device).unsqueeze(1) * T).reshape(-1))
