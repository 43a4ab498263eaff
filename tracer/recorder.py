"""The recording runtime: computes every seam exactly like the default runtime and records changes.

:class:`TracingRuntime` keeps, per (CFG context, block), ring buffers of the last ``lags`` outputs of
each token unit (attention, routed MoE sum, shared expert, block update), the previous unit inputs,
and per (token, slot) the unweighted routed-expert outputs with their expert ids. After each block
it computes the change metrics on the model's device; after each forward it stacks the metrics of
all blocks and moves them to the host in one transfer per table, as a :class:`StepRecord` handed to
a sink (normally a :class:`~moeca.tracer.writer.ShardWriter`).

Memory is bounded by ``(lags + 1) x`` the activations of one forward; it does not grow with steps
or samples. The model's outputs are bit-identical to the default runtime's: the recorder only reads
tensors the model computed, with the same operations in the same order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..models.runtime import ForwardContext, Runtime, combine_slots
from .metrics import EPS, match_slots, rel_and_cos_from_norms, ring_diff_norms
from .schema import DEFAULT_LAGS, TOKEN_UNITS

VECTOR_UNITS = ("attn", "moe", "shared", "moe_in")
"""Order of the per-token unit vectors in :attr:`StepRecord.unit_vectors` (experts come separately)."""


@dataclass
class StepRecord:
    """Host-side metrics of one traced model call (one step, one CFG context).

    ``R`` batch rows of the call, ``L`` blocks, ``T`` tokens, ``k`` slots, ``n`` dumped tokens.
    - ``cfg_rows [R]`` int8 (0 cond/unguided, 1 uncond), ``sample_rows [R]`` int32 global sample ids;
    - ``tokens [L, R, T, 2 + 4 * (1 + 2 * lags)]`` float32: ``attn_in_rel_l2_prev``,
      ``moe_in_rel_l2_prev`` and, per unit of :data:`TOKEN_UNITS`, ``norm`` then (rel_l2, cos) per lag;
    - ``branches [L, R, T, k, 5 + 2 * lags]`` float32: expert id, gate weight, out_norm, routed_prev
      (0/1), in_rel_l2_prev, then (rel_l2, cos) per lag. NaN marks a missing value (a null).
    - with vector dumps, for the ``Lv`` blocks that dump: ``vector_blocks [Lv]``, ``vector_tokens [Lv, n]``, ``unit_vectors [Lv, 4, R, n, D]``
      float16 (:data:`VECTOR_UNITS`), ``expert_vectors [Lv, R, n, k, D]`` float16 with ``expert_ids [Lv, R, n, k]``.
    """

    step: int
    t: float
    cfg_rows: torch.Tensor
    sample_rows: torch.Tensor
    tokens: torch.Tensor
    branches: torch.Tensor
    vector_blocks: torch.Tensor | None = None
    vector_tokens: torch.Tensor | None = None
    unit_vectors: torch.Tensor | None = None
    expert_vectors: torch.Tensor | None = None
    expert_ids: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    """Block index of each of the ``L`` entries when they are not ``0..L-1`` (a model whose blocks see
    different token counts, e.g. HiDream's double- and single-stream blocks, files one record per group)."""


class _BlockState:
    """Ring buffers of one (CFG context, block): ``W = lags + 1`` slots, step ``s`` in slot ``s % W``.

    The current step is written first, then every slot is compared with it through one reused
    scratch buffer (the current slot compares with itself and is dropped; slots not yet written
    are masked out), and the per-lag results are picked with one small index_select. Slots are
    valid only for steps ``count - lags .. count - 1``; everything older or unwritten (including
    values left over from a previous run after :meth:`restart`) is masked by ``count``.
    """

    def __init__(self, lags: int, shape: tuple[int, int, int], k: int, device: torch.device,
                 scratch: tuple[torch.Tensor, torch.Tensor]):
        R, T, D = shape
        W = self.width = lags + 1
        self.shape, self.k, self.count = shape, k, 0
        f32 = dict(device=device, dtype=torch.float32)
        self.units = torch.empty(W, len(TOKEN_UNITS), R, T, D, **f32)
        self.unit_norms = torch.empty(W, len(TOKEN_UNITS), R, T, **f32)
        self.inputs = torch.empty(2, 2, R, T, D, **f32)
        self.input_norms = torch.empty(2, 2, R, T, **f32)
        self.slot_out = torch.empty(W, R * T, k, D, **f32)
        self.slot_norms = torch.empty(W, R * T, k, **f32)
        self.slot_ids = torch.full((W, R * T, k), -1, device=device, dtype=torch.int64)
        # differences against one ring slot at a time go through scratch buffers shared by all
        # states of this shape (blocks run one after another); their norms are kept per state
        self.scratch_units, self.scratch_slots = scratch
        self.unit_diffs = torch.empty(W, len(TOKEN_UNITS), R, T, **f32)
        self.slot_diffs = torch.empty(W, R * T, k, **f32)
        # flat row of (slot w, row r, k-slot 0) in slot_out viewed as [W * R * T * k, D]
        self.row_base = (torch.arange(W, device=device).view(W, 1, 1) * (R * T * k)
                         + torch.arange(R * T, device=device).view(1, -1, 1) * k)
        self.lag_index: list[torch.Tensor] = [torch.tensor([(j - lag) % W for lag in range(1, W)], device=device)
                                              for j in range(W)]

    def restart(self) -> None:
        """Start a new run, keeping the buffers (no reallocation between shards of one shape)."""
        self.count = 0


@dataclass
class _Forward:
    ctx: ForwardContext
    cfg_rows: torch.Tensor
    sample_rows: torch.Tensor
    tokens: list
    branches: list
    vectors: list
    blocks: list


class TracingRuntime(Runtime):
    """Computes every seam in full and records change metrics per step (see module docstring).

    lags: compare against 1..lags steps back. step_t: model time per step (for the ``t`` column).
    vector_tokens: ``{block: token indices}`` whose full vectors are dumped (empty = no dump).
    Recording happens only between :meth:`start_shard` and :meth:`stop_shard`, for calls that carry
    a :class:`ForwardContext`; any other call is computed plainly.
    """

    def __init__(self, lags: int = DEFAULT_LAGS, step_t: Sequence[float] | None = None,
                 vector_tokens: Mapping[int, Sequence[int]] | None = None):
        if lags < 1:
            raise ValueError(f"lags must be >= 1, got {lags}")
        self.lags = lags
        self.step_t = list(step_t) if step_t is not None else None
        self.vector_tokens = {int(b): list(map(int, v)) for b, v in (vector_tokens or {}).items() if len(v)}
        if len({len(v) for v in self.vector_tokens.values()}) > 1:
            raise ValueError("vector_tokens must list the same number of tokens for every block, got "
                             f"{ {b: len(v) for b, v in self.vector_tokens.items()} }")
        self._states: dict[tuple[str, int], _BlockState] = {}
        self._scratch_buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sample_ids: torch.Tensor | None = None
        self._sink: Callable[[StepRecord], None] | None = None
        self._fwd: _Forward | None = None
        self._scratch: dict | None = None
        self._vec_index: dict[tuple[int, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ shard control
    def start_shard(self, sample_ids: Sequence[int], sink: Callable[[StepRecord], None]) -> None:
        """Record the next sampling run: batch row ``i`` is global sample ``sample_ids[i]``."""
        self._sample_ids = torch.as_tensor(list(sample_ids), dtype=torch.int32)
        self._sink = sink
        self.reset()

    def stop_shard(self) -> None:
        self._sample_ids, self._sink = None, None
        self.reset()

    def reset(self) -> None:
        """Forget every step seen so far; ring buffers are kept for reuse (see :meth:`release`)."""
        for st in self._states.values():
            st.restart()
        self._fwd = None
        self._scratch = None

    def release(self) -> None:
        """Reset and free the ring buffers."""
        self.reset()
        self._states.clear()
        self._scratch_buffers.clear()

    # ------------------------------------------------------------------ seams
    def begin_forward(self, model, ctx: ForwardContext | None, x_tokens: torch.Tensor) -> None:
        self._fwd = None
        if ctx is None or self._sample_ids is None:
            return
        R, B = x_tokens.shape[0], self._sample_ids.shape[0]
        if ctx.cfg_branch == "batched":
            if R != 2 * B:
                raise ValueError(f"batched CFG call has {R} rows; expected 2 x {B} samples of this shard")
            cfg_rows = torch.cat([torch.zeros(B, dtype=torch.int8), torch.ones(B, dtype=torch.int8)])
            sample_rows = torch.cat([self._sample_ids, self._sample_ids])
        else:
            if R != B:
                raise ValueError(f"model call has {R} rows; expected the {B} samples of this shard")
            cfg_rows = torch.full((B,), int(ctx.cfg_branch == "uncond"), dtype=torch.int8)
            sample_rows = self._sample_ids
        self._fwd = _Forward(ctx, cfg_rows, sample_rows, [], [], [], [])

    def run_blocks(self, model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self._fwd is None:
            return super().run_blocks(model, x, c)
        for block in model.blocks:
            self._scratch = {}
            x_in = x
            x = block(x, c, self)
            self._record_block(block, x - x_in)
            self._scratch = None
        return x

    def attention(self, block, x_mod: torch.Tensor) -> torch.Tensor:
        out = block.attn(x_mod)
        if self._scratch is not None:
            self._scratch["attn_in"], self._scratch["attn"] = x_mod, out
        return out

    def moe(self, block, h: torch.Tensor) -> torch.Tensor:
        """Same operations as :meth:`Runtime.moe`, keeping the routed sum and shared output apart."""
        B, T, D = h.shape
        flat = h.reshape(B * T, D)
        topk_idx, topk_weight = self.route(block, flat)
        slot_out = self.routed_experts(block, flat, topk_idx)
        out = combine_slots(slot_out, topk_weight)
        routed_sum, shared = out, None
        if block.moe.shared_experts is not None:
            shared = self.shared_expert(block, flat)
            out = out + shared
        if self._scratch is not None:
            self._scratch.update(moe_in=h, moe=routed_sum.view(B, T, D),
                                 shared=None if shared is None else shared.view(B, T, D),
                                 ids=topk_idx, weights=topk_weight, slot_out=slot_out)
        return out.view(B, T, D)

    def end_forward(self, model, ctx: ForwardContext | None) -> None:
        fwd, self._fwd = self._fwd, None
        if fwd is None or not fwd.tokens:
            return
        step = fwd.ctx.step
        t = self.step_t[step] if self.step_t is not None and step < len(self.step_t) else math.nan
        groups = _token_count_groups(fwd.tokens)
        if len(groups) > 1:   # blocks of different token counts: one record per run of equal counts
            for lo, hi in groups:
                self._sink(StepRecord(step=step, t=float(t), cfg_rows=fwd.cfg_rows, sample_rows=fwd.sample_rows,
                                      tokens=torch.stack(fwd.tokens[lo:hi]).cpu(),
                                      branches=torch.stack(fwd.branches[lo:hi]).cpu(),
                                      blocks=torch.tensor(fwd.blocks[lo:hi], dtype=torch.int32)))
            return
        record = StepRecord(step=step, t=float(t), cfg_rows=fwd.cfg_rows, sample_rows=fwd.sample_rows,
                            tokens=torch.stack(fwd.tokens).cpu(), branches=torch.stack(fwd.branches).cpu())
        if fwd.vectors:
            record.vector_blocks = torch.tensor([v[4] for v in fwd.vectors])
            record.vector_tokens = torch.stack([v[0] for v in fwd.vectors]).cpu()
            record.unit_vectors = torch.stack([v[1] for v in fwd.vectors]).cpu()
            record.expert_vectors = torch.stack([v[2] for v in fwd.vectors]).cpu()
            record.expert_ids = torch.stack([v[3] for v in fwd.vectors]).cpu()
        self._sink(record)

    def record_block(self, block, update: torch.Tensor, *, attn_in: torch.Tensor, attn: torch.Tensor,
                     moe_in: torch.Tensor, moe: torch.Tensor, shared: torch.Tensor | None, ids: torch.Tensor,
                     weights: torch.Tensor, slot_out: torch.Tensor) -> None:
        """Record one block whose units ran outside :meth:`run_blocks` (a model family attached through
        hooks, DESIGN section 1b). ``block`` has an ``index``; ``update``, ``attn_in``, ``attn``, ``moe_in``,
        ``moe`` (the gate-weighted routed sum) and ``shared`` are ``[R, T, D]``; ``ids``/``weights`` ``[R*T, k]``;
        ``slot_out`` the unweighted expert outputs ``[R*T, k, D]``. A no-op outside a recorded forward."""
        if self._fwd is None:
            return
        self._scratch = dict(attn_in=attn_in, attn=attn, moe_in=moe_in, moe=moe, shared=shared, ids=ids,
                             weights=weights, slot_out=slot_out)
        try:
            self._record_block(block, update)
        finally:
            self._scratch = None

    # ------------------------------------------------------------------ metrics
    def _state(self, key: tuple[str, int], shape: tuple[int, int, int], k: int, device: torch.device) -> _BlockState:
        st = self._states.get(key)
        if st is None or st.shape != shape or st.k != k or st.units.device != device:
            skey = (shape, k, device)
            if skey not in self._scratch_buffers:
                R, T, D = shape
                self._scratch_buffers[skey] = (
                    torch.empty(len(TOKEN_UNITS), R, T, D, device=device, dtype=torch.float32),
                    torch.empty(R * T * k, D, device=device, dtype=torch.float32))
            st = self._states[key] = _BlockState(self.lags, shape, k, device, self._scratch_buffers[skey])
        return st

    def _record_block(self, block, update: torch.Tensor) -> None:
        s, fwd = self._scratch, self._fwd
        R, T, D = update.shape
        ids, weights, out = s["ids"], s["weights"], s["slot_out"]
        N, k = ids.shape
        st = self._state((fwd.ctx.cfg_branch, block.index), (R, T, D), k, update.device)
        n, K = st.count, self.lags
        j = n % st.width
        lag_index = st.lag_index[j]                      # ring slot of lag 1..K

        # token units: write this step's slot, compare every slot with it, pick the lags
        cur = st.units[j]
        cur[0].copy_(s["attn"])
        cur[1].copy_(s["moe"])
        if s["shared"] is not None:
            cur[2].copy_(s["shared"])
        else:
            cur[2].zero_()
        cur[3].copy_(update)
        cur_norm = st.unit_norms[j]
        torch.linalg.vector_norm(cur, dim=-1, out=cur_norm)
        diff = ring_diff_norms(cur, st.units, st.scratch_units, st.unit_diffs)
        rel, cos = rel_and_cos_from_norms(diff, cur_norm.unsqueeze(0), st.unit_norms)
        lagged = torch.stack([rel, cos], dim=-1).index_select(0, lag_index)       # [K, 4, R, T, 2]
        if n < K:
            lagged[n:] = math.nan
        if s["shared"] is None:
            lagged[:, 2] = math.nan

        # unit inputs (lag 1 only)
        cur_in = st.inputs[n % 2]
        cur_in[0].copy_(s["attn_in"])
        cur_in[1].copy_(s["moe_in"])
        in_norm = st.input_norms[n % 2]
        torch.linalg.vector_norm(cur_in, dim=-1, out=in_norm)
        prev = (n - 1) % 2
        in_rel = torch.linalg.vector_norm(cur_in - st.inputs[prev], dim=-1) / (st.input_norms[prev] + EPS)
        if n < 1:
            in_rel.fill_(math.nan)

        per_unit = torch.cat([cur_norm.unsqueeze(-1),                                   # [4, R, T, 1 + 2K]
                              lagged.permute(1, 2, 3, 0, 4).reshape(len(TOKEN_UNITS), R, T, 2 * K)], dim=-1)
        fwd.tokens.append(torch.cat([in_rel.permute(1, 2, 0),
                                     per_unit.permute(1, 2, 0, 3).reshape(R, T, -1)], dim=-1))   # [R, T, F_tok]

        # branches: unweighted expert outputs per (token, slot), matched by expert id across steps
        st.slot_out[j].copy_(out)
        st.slot_ids[j].copy_(ids)
        out_cur, out_norm = st.slot_out[j], st.slot_norms[j]
        torch.linalg.vector_norm(out_cur, dim=-1, out=out_norm)
        routed, slot_then = match_slots(ids.unsqueeze(0), st.slot_ids)                 # [W, N, k]
        flat = (st.row_base + slot_then).view(st.width, -1)                            # rows of [W*N*k, D]
        ring_rows = st.slot_out.view(-1, D)
        for w in range(st.width):
            torch.index_select(ring_rows, 0, flat[w], out=st.scratch_slots)
            st.scratch_slots.sub_(out_cur.view(-1, D))
            torch.linalg.vector_norm(st.scratch_slots, dim=-1, out=st.slot_diffs[w].view(-1))
        prev_norm = st.slot_norms.view(-1).index_select(0, flat.view(-1)).view(routed.shape)
        rel, cos = rel_and_cos_from_norms(st.slot_diffs, out_norm.unsqueeze(0), prev_norm)
        routed = routed.index_select(0, lag_index)                                      # [K, N, k]
        if n < K:
            routed[n:] = False
        blagged = torch.stack([rel, cos], dim=-1).index_select(0, lag_index)            # [K, N, k, 2]
        blagged.masked_fill_(~routed.unsqueeze(-1), math.nan)
        fixed = torch.stack([ids.to(torch.float32), weights.to(torch.float32), out_norm, routed[0].to(torch.float32),
                             in_rel[1].reshape(N, 1).expand(N, k)], dim=-1)              # [N, k, 5]
        branch = torch.cat([fixed, blagged.permute(1, 2, 0, 3).reshape(N, k, 2 * K)], dim=-1)
        fwd.branches.append(branch.view(R, T, k, -1))                                   # [R, T, k, F_br]
        fwd.blocks.append(block.index)

        sel = self.vector_tokens.get(block.index)
        if sel:
            idx = self._vec_index.get((block.index, update.device))
            if idx is None:
                idx = self._vec_index[(block.index, update.device)] = torch.tensor(sel, device=update.device)
            units = torch.stack([cur[0], cur[1], cur[2], cur_in[1]]).index_select(2, idx).half()
            experts = out_cur.view(R, T, k, -1).index_select(1, idx).half()
            fwd.vectors.append((idx, units, experts, ids.view(R, T, k).index_select(1, idx), block.index))
        st.count += 1


def _token_count_groups(tokens: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``[lo, hi)`` runs of consecutive per-block token records ``[R, T, F]`` with equal ``T``."""
    groups: list[tuple[int, int]] = []
    for i, rec in enumerate(tokens):
        if groups and tokens[groups[-1][0]].shape[1] == rec.shape[1]:
            groups[-1] = (groups[-1][0], i + 1)
        else:
            groups.append((i, i + 1))
    return groups
