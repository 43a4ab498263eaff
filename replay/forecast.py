"""Forecast state of cached rows: Newton divided differences, float32, updated in place.

A cached unit keeps, per row (a token, or a (token, slot) pair), the last ``degree + 1`` values it
computed and the steps at which it computed them, as the *diagonal of the Newton divided-difference
table*: ``dd[0]`` is the newest value ``y(s_0)``, ``dd[j] = y[s_0, ..., s_j]`` the ``j``-th divided
difference over the ``j + 1`` newest computations (``s_0 > s_1 > ...``). Pushing a new value ``y`` at
step ``s`` updates the diagonal in ``O(degree)``::

    n_0 = y;   n_j = (n_{j-1} - dd[j-1]) / (s - ts[j-1])        (then ts <- [s, ts[0], ..., ts[-2]])

and the forecast at step ``s`` is the Newton polynomial, evaluated by Horner's rule::

    P(s) = dd[0] + (s - ts[0]) * (dd[1] + (s - ts[1]) * (dd[2] + ...))

Exact for unequal spacing; for equally spaced refreshes it is TaylorSeer's finite-difference Taylor
expansion of that order; degree 1 is the linear forecast ``y1 + (y1 - y0) (s - s1) / (s1 - s0)``. A row
computed only ``c < degree + 1`` times has ``dd[j] = 0`` for ``j >= c`` (it extrapolates with the order
its history allows; computed once: plain reuse). Degree 0 is plain reuse. Everything is float32 whatever
the model dtype. Shapes: ``dd [degree + 1, R, D]``, ``ts [degree + 1, R]``, ``cnt [R]`` (computations
kept, float32 in ``0..degree + 1``). ``step`` is a 0-d float32 tensor on the rows' device (the replay
runtime's ``step_value``, so compiled code does not specialise on it) or a number. All operations are
fixed-shape and free of host syncs.

``uniform`` is a host-side note: the computations every row keeps when all rows keep the same number
(every push so far was a :meth:`History.push_all`), else None. Eager pushes of all rows then skip the
per-row masking (``cnt > j``) they otherwise need -- same values, less memory traffic; compiled code
keeps the masked form (inductor fuses it, and a host value would specialise the graph).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Step = torch.Tensor | float

@dataclass
class History:
    """Preallocated forecast state of ``R`` rows of width ``D`` (see the module docstring)."""

    dd: torch.Tensor
    ts: torch.Tensor
    cnt: torch.Tensor
    uniform: int | None = 0

    @classmethod
    def empty(cls, degree: int, rows: int, width: int, device: torch.device) -> "History":
        return cls(torch.zeros(degree + 1, rows, width, dtype=torch.float32, device=device),
                   torch.zeros(degree + 1, rows, dtype=torch.float32, device=device),
                   torch.zeros(rows, dtype=torch.float32, device=device))

    @property
    def degree(self) -> int:
        return self.dd.shape[0] - 1

    @property
    def rows(self) -> int:
        return self.dd.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dd, self.ts, self.cnt))

    def push_all(self, values: torch.Tensor, step: Step) -> None:
        """Every row computed now: ``values [R, D]`` (any float dtype) at ``step``; in place."""
        self._write(None, values, step)

    def push_rows(self, rows: torch.Tensor, values: torch.Tensor, step: Step) -> None:
        """Rows ``rows [m]`` computed now as ``values [m, D]`` at ``step``; in place."""
        self._write(rows, values, step)

    def push_where(self, mask: torch.Tensor, values: torch.Tensor, step: Step) -> None:
        """Rows where ``mask [R]`` holds computed now as ``values [R, D]`` (other rows of ``values`` are
        ignored, even if not finite); fixed shape, no host sync."""
        self._write(None, values, step, mask)

    def forget(self, mask: torch.Tensor) -> None:
        """Rows where ``mask [R]`` holds have no history any more (their next push starts afresh)."""
        self.cnt.masked_fill_(mask, 0.0)
        self.uniform = None

    def _write(self, rows: torch.Tensor | None, values: torch.Tensor, step: Step,
               mask: torch.Tensor | None = None) -> None:
        p = self.degree
        y = values.float()
        if rows is not None or mask is not None:
            self.uniform = None
        if p == 0 and mask is not None:
            self.dd[0].copy_(torch.where(mask.unsqueeze(-1), y, self.dd[0]))
            self.cnt.copy_(torch.where(mask, 1.0, self.cnt))
            return
        if p == 0:
            if rows is None:
                self.dd[0].copy_(y)
                self.cnt.fill_(1.0)
                self.uniform = None if self.uniform is None else 1
            else:
                self.dd[0].index_copy_(0, rows, y)
                self.cnt.index_fill_(0, rows, 1.0)
            return
        if rows is None and mask is None:
            self._push_all_in_place(y, step)
            return
        ts = self.ts if rows is None else self.ts.index_select(1, rows)          # [p+1, m]
        dd = self.dd if rows is None else self.dd.index_select(1, rows)          # [p+1, m, D]
        cnt = self.cnt if rows is None else self.cnt.index_select(0, rows)
        cnt = torch.clamp(cnt + 1.0, max=float(p + 1))                            # [m] computations kept now
        new = [y]
        for j in range(1, p + 1):
            span = (step - ts[j - 1]).clamp_min(1.0).unsqueeze(-1)
            nj = (new[-1] - dd[j - 1]) / span
            new.append(torch.where((cnt > j).unsqueeze(-1), nj, 0.0))
        new_dd = torch.stack(new)
        new_ts = torch.cat([torch.zeros_like(ts[:1]).add_(step), ts[:-1]])
        if mask is not None:
            new_dd = torch.where(mask.view(1, -1, 1), new_dd, self.dd)
            new_ts = torch.where(mask.view(1, -1), new_ts, self.ts)
            cnt = torch.where(mask, cnt, self.cnt)
        if rows is None:
            self.dd.copy_(new_dd)
            self.ts.copy_(new_ts)
            self.cnt.copy_(cnt)
        else:
            self.dd.index_copy_(1, rows, new_dd)
            self.ts.index_copy_(1, rows, new_ts)
            self.cnt.index_copy_(0, rows, cnt)

    def _push_all_in_place(self, y: torch.Tensor, step: Step) -> None:
        """:meth:`push_all` without temporaries: ``dd[j-1]`` is read (old) before it is overwritten. While the
        host knows every row's count (``uniform``, eager only), level ``j`` is nonzero exactly when
        ``j < kept`` and needs no per-row mask; else the mask ``cnt > j`` zeroes the levels a row lacks."""
        p = self.degree
        known = self.uniform is not None and not torch.compiler.is_compiling()
        if known:
            kept = min(self.uniform + 1, p + 1)
            self.cnt.fill_(float(kept))
            self.uniform = kept
        else:
            cnt = self.cnt.add_(1.0).clamp_(max=float(p + 1))
            self.uniform = None
        prev = y
        for j in range(1, p + 1):
            if known and j >= kept:             # no row keeps j + 1 computations: levels j.. are zero
                self.dd[j - 1].copy_(prev)
                self.dd[j:].zero_()
                break
            span = (step - self.ts[j - 1]).clamp_(min=1.0).unsqueeze(-1)
            if known and j == p:                # the last level, written in place after its inputs were read
                torch.sub(prev, self.dd[j - 1], out=self.dd[j]).div_(span)
                self.dd[j - 1].copy_(prev)
                break
            nj = (prev - self.dd[j - 1]).div_(span)
            self.dd[j - 1].copy_(prev)
            prev = nj if known else torch.where((cnt > j).unsqueeze(-1), nj, 0.0)
        else:
            self.dd[p].copy_(prev)
        self.ts[1:] = self.ts[:-1].clone()
        self.ts[0].fill_(step)

    def forecast(self, step: Step) -> torch.Tensor:
        """The value of every row at ``step`` -> ``[R, D]`` float32 (``dd[0]`` itself for degree 0)."""
        p = self.degree
        if p == 0:
            return self.dd[0]
        out = self.dd[p]
        for j in range(p - 1, -1, -1):
            out = torch.addcmul(self.dd[j], out, (step - self.ts[j]).unsqueeze(-1))
        return out

    def combine(self, step: Step, weights: torch.Tensor) -> torch.Tensor:
        """Gate-weighted sum of forecasts: rows are ``N`` groups of ``k`` slots (row ``n*k + j``), ``weights
        [N, k]`` -> ``sum_j weights[n, j] * forecast(step)[n*k + j]``, ``[N, D]`` float32. For degree 1 the
        forecast is folded into the weights (``w y0 + (w (s - s0)) dd1``), so no ``[N*k, D]`` forecast is
        materialised."""
        N, k = weights.shape
        D = self.dd.shape[-1]
        w = weights.float()
        if self.degree == 1:
            terms = ((self.dd[0].view(N, k, D), w), (self.dd[1].view(N, k, D), w * (step - self.ts[0]).view(N, k)))
        else:
            terms = ((self.forecast(step).view(N, k, D), w),)
        out = None
        for values, ww in terms:
            for j in range(k):
                if out is None:
                    out = values[:, j] * ww[:, j:j + 1]
                else:
                    out.addcmul_(values[:, j], ww[:, j:j + 1])
        return out
