"""Caches of computed unit outputs and their forecasts (float32, on the model's device).

A :class:`RowCache` keeps, per row (a token, or a (token, expert) pair), the last two computed outputs
and the steps they were computed at; a :class:`WholeCache` the same for a unit computed for all rows at
once (attention, the text feed-forward, a whole MoE output), possibly several tensors (the double-stream
attention's image and text outputs). ``forecast`` is the schedule's: ``none`` gives the last computed
output, ``linear`` ``y1 + (y1 - y0) * (s - s1) / (s1 - s0)`` (a row computed once: ``y1``).
"""
from __future__ import annotations

import torch


class RowCache:
    """``rows`` rows of width ``dim``: ``y1``/``y0 [rows, dim]`` float32, steps ``s1``/``s0 [rows]``,
    ``n [rows]`` how many outputs are held (0, 1 or 2)."""

    def __init__(self, rows: int, dim: int, device: torch.device):
        f32 = dict(device=device, dtype=torch.float32)
        self.y1, self.y0 = torch.zeros(rows, dim, **f32), torch.zeros(rows, dim, **f32)
        self.s1, self.s0 = torch.zeros(rows, **f32), torch.zeros(rows, **f32)
        self.n = torch.zeros(rows, device=device, dtype=torch.int8)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.y1, self.y0, self.s1, self.s0, self.n))

    def push(self, rows: torch.Tensor, values: torch.Tensor, step: int) -> None:
        """Rows ``rows [m]`` (int64) were computed at ``step`` with outputs ``values [m, dim]``."""
        self.y0[rows] = self.y1[rows]
        self.y1[rows] = values.float()
        self.s0[rows] = self.s1[rows]
        self.s1[rows] = float(step)
        self.n[rows] = (self.n[rows] + 1).clamp_(max=2)

    def forecast(self, rows: torch.Tensor, step: int, linear: bool) -> torch.Tensor:
        """Forecast of rows ``rows [m]`` at ``step`` -> ``[m, dim]`` float32."""
        y1 = self.y1[rows]
        if not linear:
            return y1
        s1, s0 = self.s1[rows], self.s0[rows]
        c = torch.where(self.n[rows] >= 2, (step - s1) / (s1 - s0).clamp_(min=1.0), torch.zeros_like(s1))
        return y1 + (y1 - self.y0[rows]) * c.unsqueeze(1)

    def forecast_all(self, step: int, linear: bool) -> torch.Tensor:
        """:meth:`forecast` of every row (all held), without gathers -> ``[rows, dim]`` float32."""
        if not linear:
            return self.y1
        s1, s0 = self.s1, self.s0
        c = torch.where(self.n >= 2, (step - s1) / (s1 - s0).clamp(min=1.0), torch.zeros_like(s1))
        return torch.addcmul(self.y1, self.y1 - self.y0, c.unsqueeze(1))


class WholeCache:
    """A unit computed for all rows at once: the last two outputs of each of its tensors (float32)."""

    def __init__(self) -> None:
        self.y1: list[torch.Tensor] = []
        self.y0: list[torch.Tensor] = []
        self.s1 = self.s0 = 0.0
        self.n = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.y1, *self.y0))

    def push(self, values: tuple[torch.Tensor, ...], step: int) -> None:
        if self.n == 2 and [v.shape for v in values] == [y.shape for y in self.y0]:
            self.y0, self.y1 = self.y1, self.y0
            for dst, v in zip(self.y1, values):
                dst.copy_(v)
        else:
            self.y0, self.y1 = self.y1, [v.float().clone() for v in values]
        self.s0, self.s1 = self.s1, float(step)
        self.n = min(self.n + 1, 2)

    def forecast(self, step: int, linear: bool, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        if not linear or self.n < 2:
            return tuple(y.to(dtype) for y in self.y1)
        c = (step - self.s1) / max(self.s1 - self.s0, 1.0)
        return tuple(torch.add(y1, y1 - y0, alpha=c).to(dtype) for y1, y0 in zip(self.y1, self.y0))
