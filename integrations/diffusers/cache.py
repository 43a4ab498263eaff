"""Caches of computed unit outputs and their forecasts (float32, on the model's device).

A :class:`RowCache` keeps, per row (a token, or a (token, expert) pair), the last two computed outputs
and the steps they were computed at; a :class:`WholeCache` the same for a unit computed for all rows at
once (attention, the text feed-forward, a whole MoE output), possibly several tensors (the double-stream
attention's image and text outputs), in the native replay engine's forecast histories. ``forecast`` is the
schedule's: ``none`` gives the last computed output, ``linear`` ``y1 + (y1 - y0) * (s - s1) / (s1 - s0)``
(a row computed once: ``y1``).
"""
from __future__ import annotations

import torch

from moeca.replay.forecast import History


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
    """A unit computed for all rows at once: each of its tensors (``[B, T_i, D]``) kept in a forecast
    :class:`~moeca.replay.forecast.History` of the native replay engine (degree 1 for ``linear``, 0 for plain
    reuse; float32), so reuse forecasts with the same code and the folded stack sum
    (:mod:`moeca.replay.units.stack`) reads its values. A push of other shapes starts the history afresh."""

    def __init__(self, degree: int) -> None:
        self.degree = degree
        self.hists: list[History] = []
        self.shapes: list[torch.Size] = []

    @property
    def n(self) -> int:
        """Outputs held (every row shares its steps: all pushed whole)."""
        return self.hists[0].uniform or 0 if self.hists else 0

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes() for h in self.hists)

    def push(self, values: tuple[torch.Tensor, ...], step: int) -> None:
        shapes = [v.shape for v in values]
        if shapes != self.shapes:
            self.shapes = shapes
            self.hists = [History.empty(self.degree, v.shape[0] * v.shape[1], v.shape[-1], v.device) for v in values]
        for h, v in zip(self.hists, values):
            h.push_all(v.reshape(h.rows, -1), float(step))

    def level(self, i: int, j: int) -> torch.Tensor:
        """Tensor ``i``'s ``j``-th newest kept value, ``[B, T_i, D]`` float32 (a view of the buffers)."""
        return self.hists[i].level(j).view(self.shapes[i])

    def forecast(self, step: int, linear: bool, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Every tensor at ``step`` (``linear`` is the history's degree), in ``dtype``."""
        return tuple(h.forecast(float(step)).view(shape).to(dtype) for h, shape in zip(self.hists, self.shapes))
