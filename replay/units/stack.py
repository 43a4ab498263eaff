"""The whole block stack forecast at once: a step whose every block reuses attention and the whole MoE output.

On such a step (TaylorSeer's and FORA's cached steps, MoECa's token-level forecast steps) no block computes
anything from its input: block ``b`` adds ``gate_msa_b * A_b(s) + gate_mlp_b * M_b(s)`` to the residual
stream, where ``A_b(s)`` / ``M_b(s)`` are the forecasts of its cached attention / MoE outputs (``[N, D]``)
and the gates ``[B, D]`` come from the conditioning ``c``. So the stack's output is::

    x + sum_u gate_u(s) * F_u(s),      F_u(s) = sum_j l_j(s) value_j(u)      (u: the 2 * depth units)

:func:`forecast_stack` computes exactly that, without the dead work of the block-by-block path (``norm2``
and the modulation of the MoE input): each block's adaLN projection for its gates, one forecast per unit
accumulated in float32 into the residual -- the block-by-block path's sum up to summation order. It reads
every unit's kept values at every forecast step (``2 depth (p + 1) N D`` floats: 19 MB on the demo model
at batch 16, memory-bound on a CPU).

:func:`forecast_folded` folds that sum. With the gates forecast by the same Lagrange rule from their values
at the last two full refreshes, ``gate_u(s) ~ sum_i m_i(s) gate_i(u)``, the sum is bilinear in the two
sets of weights::

    sum_u gate_u(s) * F_u(s) = sum_i sum_j m_i(s) l_j(s) P_ij,      P_ij = sum_u gate_i(u) * value_j(u)

The ``2 (p + 1)`` products ``P_ij [N, D]`` change only when the units are computed; :func:`refresh_folded`
rebuilds them at every full refresh (``p + 1`` multiply-adds per unit: the older gates' products with
the older values are the last fold's newest ones, shifted, and ``P_00`` is the residual the blocks just
added), and a forecast step reads
``2 (p + 1)`` tensors instead of ``2 depth (p + 1)``. The gates are the only approximation: they are
smooth functions of the timestep: on both shipped models the folded sum's samples (64, against full
compute) were within -0.03..+0.10 dB PSNR of the exact gates' at 9 to 24 refreshes of 50 steps
(``tests/test_stack_fold.py`` checks a 9-refresh run of the demo model). The fold runs
when every step of the schedule computes or forecasts every unit (:attr:`.plan.SchedulePlan.fold_stack`;
``ReplayRuntime(fold=False)`` turns it off) and two full refreshes have been folded; before that (the
first refresh interval) the exact sum runs.
Shapes: ``x [B, T, D]``, ``c [B, D]`` -> ``[B, T, D]`` in ``x``'s dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from moeca.models.dit_moe import DiTMoEBlock

from ..forecast import History
from ..state import StackProducts

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import ReplayRuntime

GATE_DEGREE = 1
"""The gates' forecast: linear through their values at the last two full refreshes."""


def stack_ready(rt: "ReplayRuntime", model, rows: int) -> bool:
    """Whether every block holds a valid cached attention and MoE output of ``rows`` rows (host flags only)."""
    if not rt.kind.forecast_all:
        return False
    for block, st in zip(model.blocks, rt.context.blocks):
        if not isinstance(block, DiTMoEBlock):
            return False
        for cache in (st.attn, st.moe):
            if not cache.valid or cache.hist is None or cache.hist.rows != rows:
                return False
    return True


def _units(rt: "ReplayRuntime", model):
    """``(block, cache)`` of every unit, attention then MoE per block (``U = 2 depth``)."""
    for block, st in zip(model.blocks, rt.context.blocks):
        yield block, st.attn
        yield block, st.moe


def _gates(model, c: torch.Tensor) -> torch.Tensor:
    """Every unit's adaLN gate ``[U, B, D]`` float32 (attention then MoE per block): SiLU of ``c [B, D]`` once,
    and of each block's projection only its two gate chunks (row slices of the parameters, so always current):
    a third of the projections the blocks compute."""
    h = torch.nn.functional.silu(c)
    out = []
    for block in model.blocks:
        proj = block.adaLN_modulation[-1]
        D = proj.out_features // 6
        for chunk in (2, 5):
            rows = slice(chunk * D, (chunk + 1) * D)
            out.append(torch.nn.functional.linear(h, proj.weight[rows], proj.bias[rows]))
    return torch.stack(out).float()


def _note(rt: "ReplayRuntime", model, N: int) -> None:
    """What the block-by-block path records of a step that reuses every unit."""
    for block, st in zip(model.blocks, rt.context.blocks):
        rt.note_reused("attention", block.index, st.attn)
        rt.note_reused("moe", block.index, st.moe)
        rt.count("tokens", block.index, N)
        rt.count("pairs", block.index, N * block.moe.top_k)
        st.experts.valid = st.shared.valid = False   # as after any token-level reuse of the whole MoE output


def forecast_stack(rt: "ReplayRuntime", model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The block stack's output on a step that forecasts every unit of every block, unit by unit with the
    exact gates (see the module docstring)."""
    B, T, D = x.shape
    N = B * T
    step, degree = rt.step, rt.plan.degree
    acc = x.to(torch.float32, copy=True)
    gates = _gates(model, c).unsqueeze(2)                                            # [U, B, 1, D]
    for u, (block, cache) in enumerate(_units(rt, model)):
        acc.addcmul_(cache.hist.forecast(step).view(B, T, D), gates[u])
        rt.count("forecast", block.index, N * degree)
    _note(rt, model, N)
    return acc.to(x.dtype)


def fold_ready(rt: "ReplayRuntime", rows: int) -> bool:
    """Whether the folded sum can run: the runtime folds (``rt.fold``: asked for and the plan allows it) and
    two full refreshes of ``rows`` rows are folded."""
    sp = rt.context.stack
    return rt.fold and sp is not None and sp.refreshes > GATE_DEGREE and sp.prods.shape[2] == rows


def refresh_folded(rt: "ReplayRuntime", model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A full refresh of a folding plan: every block computes (each unit pushing its values, as on any
    refresh), and the products ``P_ij`` are rebuilt from the units' kept values block by block, while a
    block's new values are still in cache; the units' gates are pushed first (see the module docstring).
    ``P_00``, this refresh's gates times this refresh's values summed over the units, is what the blocks
    add to the residual stream: the stack's output minus its input. ``x [B, T, D]`` -> the stack's output."""
    B, T, D = x.shape
    cs = rt.context
    cs.stack, fold = begin_fold(cs.stack, _gates(model, c), rt.step, T, rt.plan.degree)
    x_in = x
    for block, st in zip(model.blocks, cs.blocks):
        x = block(x, c, rt)
        for u, cache in ((2 * block.index, st.attn), (2 * block.index + 1, st.moe)):
            fold.add(u, lambda j, h=cache.hist: h.level(j).view(B, T, D))
        rt.count("stack", block.index, 2 * (fold.degree + 1) * B * T)
    end_fold(cs.stack, x, x_in)
    rt.count("stack", 0, B * T)
    return x


# ----------------------------------------------------------------------------- the fold, for any model family
@dataclass
class FoldRefresh:
    """The products being rebuilt at one full refresh (:func:`begin_fold`): the units' ``newest`` and
    ``older`` gates ``[U, B, 1, D]`` and the ``fresh`` products ``[B, T, D]`` (views of ``prods``) that
    :meth:`add` accumulates: ``P_0j`` for ``j = 1..p``, then ``P_10``."""

    newest: torch.Tensor
    older: torch.Tensor
    fresh: list[torch.Tensor]
    degree: int

    def add(self, u: int, level: Callable[[int], torch.Tensor]) -> None:
        """Unit ``u``'s kept values (``level(j)``: the ``j``-th newest, ``[B, T, D]``, any strides) into the
        products: ``p + 1`` multiply-adds."""
        for j in range(1, self.degree + 1):
            self.fresh[j - 1].addcmul_(level(j), self.newest[u])
        self.fresh[-1].addcmul_(level(0), self.older[u])


def begin_fold(sp: StackProducts | None, gates: torch.Tensor, step: "torch.Tensor | float", tokens: int,
               degree: int) -> tuple[StackProducts, FoldRefresh]:
    """Start rebuilding the folded products at a full refresh: push the units' gates ``[U, B, D]`` (float32,
    unit-major) at ``step``, shift the last fold's newest products into the older gates' row, zero the ones
    this refresh accumulates. ``tokens``: ``T``, rows per batch row of the summed units; ``degree``: ``p``,
    the units' forecast degree. A state of another shape or device is replaced (its fold starts afresh).
    Returns the state and the :class:`FoldRefresh` whose :meth:`~FoldRefresh.add` takes each unit."""
    U, B, D = gates.shape
    N, p = B * tokens, degree
    if sp is None or sp.prods.shape[2] != N or sp.prods.shape[1] != p + 1 or sp.prods.device != gates.device \
            or sp.gates.rows != U * B:
        sp = StackProducts(History.empty(GATE_DEGREE, U * B, D, gates.device),
                           torch.zeros(GATE_DEGREE + 1, p + 1, N, D, dtype=torch.float32, device=gates.device))
    sp.gates.push_all(gates.view(U * B, D), step)
    newest, older = (sp.gates.level(i).view(U, B, 1, D) for i in (0, 1))
    # the push made the newest gates and values the older ones: P_1(j+1) is the last fold's P_0j
    sp.prods[1, 1:].copy_(sp.prods[0, :p])
    fresh = [sp.prods[0, j].view(B, tokens, D) for j in range(1, p + 1)] + [sp.prods[1, 0].view(B, tokens, D)]
    for out in fresh:
        out.zero_()
    return sp, FoldRefresh(newest, older, fresh, p)


def end_fold(sp: StackProducts, x_out: torch.Tensor, x_in: torch.Tensor) -> None:
    """Finish a refresh's fold: ``P_00``, this refresh's gates times its values summed over the units, is
    what the units added to the residual stream, the stack's output ``x_out`` minus its input ``x_in``
    (``[B, T, D]`` each, any dtype; float32 difference)."""
    N, D = sp.prods.shape[2], sp.prods.shape[3]
    torch.sub(x_out.reshape(N, D).float(), x_in.reshape(N, D).float(), out=sp.prods[0, 0])
    sp.refreshes = min(sp.refreshes + 1, GATE_DEGREE + 1)


def fold_sum(sp: StackProducts, base: torch.Tensor, step: "torch.Tensor | float",
             lag: "list[torch.Tensor | float]") -> tuple[torch.Tensor, int]:
    """``base + sum_ij m_i(step) l_j(step) P_ij`` -> ``[N, D]`` float32: ``base [N, D]`` float32 (the stack's
    input; not written), ``lag``: the units' forecast weights at ``step`` (``[1.0]`` for plain reuse), the
    gates' from their history. Also returns the terms summed (``2 (p + 1)`` multiply-adds)."""
    acc, gate_weights = None, sp.gates.weights(step)
    for i, m in enumerate(gate_weights):
        for j, l in enumerate(lag):
            w, term = _scalar(m) * _scalar(l), sp.prods[i, j]
            if isinstance(w, torch.Tensor):
                w = w.view(-1, 1)
                acc = torch.addcmul(base, term, w) if acc is None else acc.addcmul_(term, w)
            else:
                acc = torch.add(base, term, alpha=w) if acc is None else acc.add_(term, alpha=w)
    return acc, len(gate_weights) * len(lag)


def _scalar(w: "torch.Tensor | float") -> "torch.Tensor | float":
    """One weight for all rows: a per-row weight (compiled code's general form) is the same on every row
    here (every unit and gate is pushed at the same full refreshes), so its first entry."""
    return w[:1] if isinstance(w, torch.Tensor) and w.dim() else w


def forecast_folded(rt: "ReplayRuntime", model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The block stack's output on a step that forecasts every unit, as the folded sum
    ``x + sum_ij m_i(s) l_j(s) P_ij`` (see the module docstring)."""
    B, T, D = x.shape
    N = B * T
    step = rt.step
    sp = rt.context.stack
    lag = [1.0] if rt.plan.degree == 0 else rt.context.blocks[0].attn.hist.weights(step)
    base = x.reshape(N, D).float()  # no copy for float32: the first term adds into a new tensor, the others in place
    acc, terms = fold_sum(sp, base, step, lag)
    rt.count("stack", 0, N * terms)
    _note(rt, model, N)
    return acc.view(B, T, D).to(x.dtype)
