"""Forecast state of cached rows: the last computed values, float32, in preallocated buffers.

A cached unit keeps, per row (a token, or a (token, slot) pair), the last ``degree + 1`` values it
computed and the steps at which it computed them. A forecast at step ``s`` is a weighted sum of them; the
weights depend on the forecast *kind* (the schedule's ``forecast``), with ``y_j`` computed at ``s_j``
(``j = 0`` the newest, ``s_0 > s_1 > ...``):

- ``polynomial`` -- the interpolating polynomial through them, in Lagrange form::

      P(s) = sum_j l_j(s) y_j,      l_j(s) = prod_{i != j} (s - s_i) / (s_j - s_i)

- ``taylor`` -- TaylorSeer's finite-difference Taylor expansion: derivative estimates by differences
  divided by the *latest* spacing, ``d_0^(j) = y_j``, ``d_{i+1}^(j) = (d_i^(j) - d_i^(j+1)) / (s_j - s_{j+1})``
  (``d_i^(j+1)`` is the estimate stored at the ``j+1``-th newest computation), evaluated as
  ``F(s) = sum_i d_i^(0) k^i / i!`` with ``k = s - s_0``.

The two agree at degree 1 (the linear forecast ``y_0 + (y_0 - y_1) (s - s_0) / (s_0 - s_1)``) and differ
from degree 2 on, even with equal spacing ``N``: at degree 2 the Taylor form is ``P(s) - (k N / 2) d_2``
(its second derivative is estimated at the older point). A row computed only ``c < degree + 1`` times uses
its ``c`` values (the order its history allows; computed once: plain reuse), as TaylorSeer does while its
derivative table fills. Degree 0 is plain reuse. Everything is float32 whatever the model dtype.

Why values and not derivative estimates: a push is then one copy of the new values, and a forecast one
multiply-add per kept value on ``[R, D]``; the weights are computed on ``[R]``, or once for all rows as
host arithmetic (see ``host_ts``). Both kinds are linear in the kept values, so both are weights.

Shapes: ``vals [degree + 1, R, D]`` (the buffers; ``level(j)`` is the ``j``-th newest value), ``ts
[degree + 1, R]`` (steps, newest first), ``cnt [R]`` (values kept, float32 in ``0..degree + 1``). ``step``
is a number (eager replay) or a 0-d float32 tensor on the rows' device (the replay runtime's
``step_value`` in compiled code, so the graph does not specialise on it). All operations are fixed-shape
and free of host syncs.

Host-side notes, used in eager code only (compiled code keeps the general form: a host value would
specialise the graph): ``host_ts`` -- the steps every row keeps, newest first, while all rows share them
(every push so far a :meth:`History.push_all` at a step given as a number), else None; the weights are
then host arithmetic, once for all rows, with no per-row masks (``uniform``, the number of values every
row keeps, is its length). ``slots`` -- which buffer of ``vals`` holds the ``j``-th newest value: an eager
push of all rows turns this ring instead of shifting the buffers (one copy per push); compiled code shifts
the buffers and never turns it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Step = torch.Tensor | float
KINDS = ("polynomial", "taylor")
"""Forecast kinds a history evaluates (the module docstring); plain reuse and ``linear`` are degrees 0 and 1."""


def polynomial_weights(step: float, ts: list[float]) -> list[float]:
    """Lagrange weights ``l_j(step)`` of values computed at ``ts`` (newest first)."""
    n = len(ts)
    return [math.prod((step - ts[i]) / (ts[j] - ts[i]) for i in range(n) if i != j) for j in range(n)]


def taylor_weights(step: float, ts: list[float]) -> list[float]:
    """TaylorSeer's weights of values computed at ``ts`` (newest first): the finite-difference Taylor
    expansion of order ``len(ts) - 1`` around ``ts[0]`` evaluated at ``step``, written per kept value."""
    n = len(ts)
    unit = [[1.0 if i == j else 0.0 for i in range(n)] for j in range(n)]
    d = unit                                                   # d[j]: coefficients of d_i^(j), i = 0 here
    out = [0.0] * n
    k = step - ts[0] if n else 0.0
    for order in range(n):
        term = k ** order / math.factorial(order)
        out = [o + term * c for o, c in zip(out, d[0])]
        d = [[(a - b) / (ts[j] - ts[j + 1]) for a, b in zip(d[j], d[j + 1])] for j in range(len(d) - 1)]
    return out


@dataclass
class History:
    """Preallocated forecast state of ``R`` rows of width ``D`` (see the module docstring)."""

    vals: torch.Tensor
    ts: torch.Tensor
    cnt: torch.Tensor
    slots: list[int] = field(default_factory=list)
    host_ts: list[float] | None = field(default_factory=list)
    kind: str = "polynomial"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"forecast kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.slots:
            self.slots = list(range(self.vals.shape[0]))

    @classmethod
    def empty(cls, degree: int, rows: int, width: int, device: torch.device, kind: str = "polynomial") -> "History":
        """Zeroed buffers for ``rows x width``; ``kind`` one of :data:`KINDS` (equal up to degree 1)."""
        return cls(torch.zeros(degree + 1, rows, width, dtype=torch.float32, device=device),
                   torch.zeros(degree + 1, rows, dtype=torch.float32, device=device),
                   torch.zeros(rows, dtype=torch.float32, device=device), kind=kind)

    @property
    def degree(self) -> int:
        return self.vals.shape[0] - 1

    @property
    def rows(self) -> int:
        return self.vals.shape[1]

    @property
    def uniform(self) -> int | None:
        """The number of values every row keeps while all rows share their steps (``host_ts``), else None."""
        return None if self.host_ts is None else len(self.host_ts)

    def level(self, j: int) -> torch.Tensor:
        """The ``j``-th newest computed values ``[R, D]`` (a view of the buffers)."""
        return self.vals[self.slots[j]]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.vals, self.ts, self.cnt))

    # -- pushes --------------------------------------------------------------------------------
    def push_all(self, values: torch.Tensor, step: Step) -> None:
        """Every row computed now: ``values [R, D]`` (any float dtype) at ``step``; in place."""
        p = self.degree
        compiling = torch.compiler.is_compiling()
        shared = self.host_ts is not None and not compiling and not isinstance(step, torch.Tensor)
        if shared and self.host_ts and not float(step) > self.host_ts[0]:
            raise ValueError(f"History.push_all: step {step} does not follow the last computed step "
                             f"{self.host_ts[0]:g}; a forecast history needs increasing steps")
        if compiling:
            for j in range(p, 0, -1):
                self.level(j).copy_(self.level(j - 1))
        else:
            self.slots = self.slots[-1:] + self.slots[:-1]
        self.level(0).copy_(values)
        if p:
            self.ts[1:] = self.ts[:-1].clone()
        self.ts[0].fill_(step)
        if shared:
            self.host_ts = [float(step)] + self.host_ts[:p]
            self.cnt.fill_(float(len(self.host_ts)))
        else:
            self.host_ts = None
            self.cnt.add_(1.0).clamp_(max=float(p + 1))

    def push_rows(self, rows: torch.Tensor, values: torch.Tensor, step: Step) -> None:
        """Rows ``rows [m]`` computed now as ``values [m, D]`` at ``step``; in place."""
        p = self.degree
        for j in range(p, 0, -1):
            self.level(j).index_copy_(0, rows, self.level(j - 1).index_select(0, rows))
        self.level(0).index_copy_(0, rows, values.float())
        ts = self.ts.index_select(1, rows)
        self.ts.index_copy_(1, rows, torch.cat([torch.zeros_like(ts[:1]).add_(step), ts[:-1]]))
        self.cnt.index_copy_(0, rows, (self.cnt.index_select(0, rows) + 1.0).clamp_(max=float(p + 1)))
        self.host_ts = None

    def push_where(self, mask: torch.Tensor, values: torch.Tensor, step: Step) -> None:
        """Rows where ``mask [R]`` holds computed now as ``values [R, D]`` (other rows of ``values`` are
        ignored, even if not finite); fixed shape, no host sync."""
        p = self.degree
        m = mask.unsqueeze(-1)
        for j in range(p, 0, -1):
            self.level(j).copy_(torch.where(m, self.level(j - 1), self.level(j)))
        self.level(0).copy_(torch.where(m, values.float(), self.level(0)))
        shifted = torch.cat([torch.zeros_like(self.ts[:1]).add_(step), self.ts[:-1]])
        self.ts.copy_(torch.where(mask.unsqueeze(0), shifted, self.ts))
        self.cnt.copy_(torch.where(mask, (self.cnt + 1.0).clamp(max=float(p + 1)), self.cnt))
        self.host_ts = None

    def forget(self, mask: torch.Tensor) -> None:
        """Rows where ``mask [R]`` holds have no history any more (their next push starts afresh)."""
        self.cnt.masked_fill_(mask, 0.0)
        self.host_ts = None

    # -- forecasts -----------------------------------------------------------------------------
    def weights(self, step: Step) -> list[torch.Tensor | float]:
        """The weights of the kept values at ``step``, newest first (:func:`polynomial_weights` or
        :func:`taylor_weights` by ``kind``): ``[R]`` float32 each (0 where a row keeps fewer values); while
        all rows share their steps (``host_ts``), one weight for all rows, for the levels they keep: a
        Python float (a 0-d tensor if ``step`` is one), no per-row work. Up to two kept values the two kinds
        are the same forecast and take the polynomial's arithmetic (``linear`` bit for bit)."""
        ts = self.host_ts
        if ts is not None and not torch.compiler.is_compiling():
            return (taylor_weights if self.kind == "taylor" and len(ts) > 2 else polynomial_weights)(step, ts)
        return self._taylor_rows(step) if self.kind == "taylor" and self.degree > 1 else self._polynomial_rows(step)

    def _polynomial_rows(self, step: Step) -> list[torch.Tensor]:
        n = self.degree + 1
        if n == 2:          # the linear forecast in closed form: the loop below, with fewer operators
            two = self.cnt > 1
            return [torch.where(two, (step - self.ts[1]) / (self.ts[0] - self.ts[1]), self.cnt.clamp(max=1.0)),
                    torch.where(two, (step - self.ts[0]) / (self.ts[1] - self.ts[0]), 0.0)]
        out = []
        for j in range(n):
            w = torch.ones_like(self.ts[0])
            for i in range(n):
                if i != j:
                    f = (step - self.ts[i]) / (self.ts[j] - self.ts[i])
                    w = w * torch.where(self.cnt > i, f, 1.0)
            out.append(torch.where(self.cnt > j, w, 0.0))
        return out

    def _taylor_rows(self, step: Step) -> list[torch.Tensor]:
        """Per-row :func:`taylor_weights`: order ``i`` contributes where the row keeps ``> i`` values;
        spacings a row does not have are replaced by 1 (their terms are masked out)."""
        n = self.degree + 1
        zero, one = torch.zeros_like(self.ts[0]), torch.ones_like(self.ts[0])
        d = [[one if i == j else zero for i in range(n)] for j in range(n)]
        out = [zero] * n
        k = step - self.ts[0]
        for order in range(n):
            term = torch.where(self.cnt > order, k ** order / math.factorial(order), zero)
            out = [o + term * c for o, c in zip(out, d[0])]
            d = [[(a - b) / torch.where(self.cnt > j + 1, self.ts[j] - self.ts[j + 1], one)
                  for a, b in zip(d[j], d[j + 1])] for j in range(len(d) - 1)]
        return out

    def forecast(self, step: Step) -> torch.Tensor:
        """The value of every row at ``step`` -> ``[R, D]`` float32 (the newest values themselves for plain
        reuse: degree 0, or every row computed once). Two kept values are one ``lerp`` (the weights sum to
        one), more a multiply-add each."""
        if self.degree == 0 or self.uniform == 1:
            return self.level(0)
        ws = [w.unsqueeze(-1) if isinstance(w, torch.Tensor) else w for w in self.weights(step)]
        if not ws:
            return torch.zeros_like(self.level(0))
        if len(ws) == 2 and not isinstance(ws[0], torch.Tensor):
            return torch.lerp(self.level(1), self.level(0), ws[0])
        out = self.level(0) * ws[0]
        for j in range(1, len(ws)):
            if isinstance(ws[j], torch.Tensor):
                out.addcmul_(self.level(j), ws[j])
            else:
                out.add_(self.level(j), alpha=ws[j])
        return out

    def combine(self, step: Step, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gate-weighted sum of forecasts: rows are ``N`` groups of ``k`` slots (row ``n*k + j``), ``weights
        [N, k]`` -> ``sum_j weights[n, j] * forecast(step)[n*k + j]``, ``[N, D]`` float32. The Lagrange
        weights are folded into the gates, so no ``[N*k, D]`` forecast is materialised. ``out``: a float32
        ``[N, D]`` the sum is added to in place (and returned), e.g. the shared expert's forecast."""
        N, k = weights.shape
        D = self.vals.shape[-1]
        w = weights.float()
        lag = [1.0] if self.degree == 0 else self.weights(step)
        for j, l in enumerate(lag):
            values = self.level(j).view(N, k, D)
            ww = w * (l.view(N, k) if isinstance(l, torch.Tensor) and l.numel() > 1 else l)
            for slot in range(k):
                if out is None:
                    out = values[:, slot] * ww[:, slot:slot + 1]
                else:
                    out.addcmul_(values[:, slot], ww[:, slot:slot + 1])
        return torch.zeros(N, D, dtype=torch.float32, device=w.device) if out is None else out
