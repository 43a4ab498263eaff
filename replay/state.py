"""Per-CFG-context cache state of the replay engine, in buffers allocated once and updated in place.

A context's buffers are allocated at its first forward (when the batch is known) and reused by every
later step; they are dropped when the runtime is reset, when the context's batch size changes or when
its step does not advance. Shapes: ``N = B*T`` rows, ``D`` width, ``k`` top-k slots per row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .forecast import History


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class RowCache:
    """One unit's cached rows: the forecast history (``History``: the last computed values and their steps;
    degree 0 = the last value only) and, for scored rules, per row the age (steps since computed) and
    the accumulated relative input drift since then (``[R]`` float32). ``valid``: something was stored
    since the context started (a Python flag: the first step of a context always computes)."""

    hist: History | None = None
    age: torch.Tensor | None = None
    acc: torch.Tensor | None = None
    valid: bool = False

    def ensure(self, degree: int, rows: int, width: int, track: bool, device: torch.device,
               kind: str = "polynomial") -> None:
        """Allocate the buffers for ``rows x width`` (once; again only if the shape changed); ``kind``: the
        forecast kind of the history (:data:`~.forecast.KINDS`, the plan's ``forecast_kind``)."""
        if self.hist is None or self.hist.rows != rows or self.hist.vals.shape[-1] != width \
                or self.hist.vals.device != device:
            self.hist = History.empty(degree, rows, width, device, kind)
            self.age = torch.zeros(rows, dtype=torch.float32, device=device) if track else None
            self.acc = torch.zeros(rows, dtype=torch.float32, device=device) if track else None
            self.valid = False

    def bump(self, drift: torch.Tensor | None) -> None:
        """One more step without recompute: age + 1, accumulated drift + this step's input drift ``[R]``."""
        if self.age is not None:
            self.age.add_(1.0)
            if drift is not None:
                self.acc.add_(drift)

    def computed(self, rows: torch.Tensor | None) -> None:
        """Age and drift restart for rows computed now (``None`` = all rows)."""
        if self.age is None:
            return
        if rows is None:
            self.age.zero_()
            self.acc.zero_()
        else:
            self.age.index_fill_(0, rows, 0.0)
            self.acc.index_fill_(0, rows, 0.0)

    def nbytes(self) -> int:
        return (self.hist.nbytes() if self.hist is not None else 0) + _nbytes(self.age, self.acc)


@dataclass
class PairCache(RowCache):
    """Routed experts: rows are (token, storage slot) pairs, ``N*k`` of them. ``ids [N, k]`` holds the
    expert cached in each storage slot. A persisting (token, expert) pair keeps its storage slot from
    step to step (no gather of the history); a newly routed pair takes a slot its token no longer uses.
    ``ref_ids [N, k]``: ``ids`` as the last store of every pair left them (a synchronized refresh), kept for
    routing-aware steps only (which tokens' routed experts changed since; None otherwise)."""

    ids: torch.Tensor | None = None
    ref_ids: torch.Tensor | None = None

    def nbytes(self) -> int:
        return super().nbytes() + _nbytes(self.ids, self.ref_ids)


@dataclass
class DriftTracker:
    """A unit's previous input ``[N, D]`` and its row norms ``[N]`` (float32), for the relative drift."""

    prev: torch.Tensor | None = None
    prev_norm: torch.Tensor | None = None
    valid: bool = False

    def update(self, cur: torch.Tensor) -> torch.Tensor | None:
        """Relative L2 change of each row of ``cur [N, D]`` since the previous call -> ``[N]`` float32
        (None at the first call or after a shape change); remembers ``cur`` in place."""
        cur = cur.reshape(-1, cur.shape[-1])
        cur_norm = cur.float().norm(dim=-1)
        drift = None
        if self.valid and self.prev is not None and self.prev.shape == cur.shape:
            drift = (cur - self.prev).float().norm(dim=-1) / (self.prev_norm + 1e-12)
        if self.prev is None or self.prev.shape != cur.shape:
            self.prev, self.prev_norm = torch.empty_like(cur), torch.empty_like(cur_norm)
        self.prev.copy_(cur)
        self.prev_norm.copy_(cur_norm)
        self.valid = True
        return drift

    def nbytes(self) -> int:
        return _nbytes(self.prev, self.prev_norm)


@dataclass
class BlockState:
    """Caches of one block: attention, shared expert, whole-MoE output (token-level rules), routed pairs."""

    attn: RowCache = field(default_factory=RowCache)
    shared: RowCache = field(default_factory=RowCache)
    moe: RowCache = field(default_factory=RowCache)
    experts: PairCache = field(default_factory=PairCache)
    attn_drift: DriftTracker = field(default_factory=DriftTracker)
    moe_drift: DriftTracker = field(default_factory=DriftTracker)

    def nbytes(self) -> int:
        return sum(u.nbytes() for u in (self.attn, self.shared, self.moe, self.experts, self.attn_drift,
                                        self.moe_drift))


@dataclass
class StackProducts:
    """Folded forecast state of the whole block stack (:mod:`.units.stack`), for ``U = 2 * depth`` units
    (attention and whole MoE output of every block, unit ``2 b`` and ``2 b + 1``).

    gates: the units' adaLN gates at the last two full refreshes, a degree-1 :class:`History` of ``U * B``
    rows of width ``D`` (unit-major: rows ``u B .. u B + B - 1`` hold unit ``u``'s gates ``[B, D]``);
    prods ``[2, p + 1, N, D]`` float32: ``prods[i, j] = sum_u gate_i(u) * value_j(u)``, the ``i``-th
    newest refresh's gates (broadcast over the tokens) times the unit's ``j``-th newest kept value;
    refreshes: full refreshes folded so far (host int, saturating at 2: the fold needs two gate values)."""

    gates: History
    prods: torch.Tensor
    refreshes: int = 0

    def nbytes(self) -> int:
        return self.gates.nbytes() + _nbytes(self.prods)


@dataclass
class ContextState:
    """Everything cached for one CFG context (``none``, ``batched``, ``cond`` or ``uncond``); the
    whole-model skip keeps the previous change indicator ``model_prev`` (TeaCache: block 0's modulated input
    at the previous forward; First-Block Cache: the first blocks' residual at the last computed forward),
    the accumulated rescaled change and the residual of the skippable blocks at the last computed step;
    ``stack``: the folded stack forecast's state."""

    batch: int
    blocks: list[BlockState]
    last_step: int = -1
    model_prev: torch.Tensor | None = None
    model_acc: float = 0.0
    residual: torch.Tensor | None = None
    stack: StackProducts | None = None

    def nbytes(self) -> int:
        return (sum(b.nbytes() for b in self.blocks) + _nbytes(self.model_prev, self.residual)
                + (self.stack.nbytes() if self.stack is not None else 0))
