"""The replay runtime: follows a :class:`~moeca.policy.schedule.Schedule` at the model's seams.

Caches (per CFG context, per block; all in the model's dtype and device):

- attention output per token ``[B, T, D]``; shared-expert output per token ``[N, D]``;
- routed experts: the expert ids per (token, slot) ``[N, k]`` and the *unweighted* outputs
  ``[N*k, D]`` (bounded memory: ``k*N*D`` per block, independent of the number of experts);
- the whole MoE output per token ``[N, D]`` only when a schedule reuses it at token level;
- the residual of all blocks ``[B, T, D]`` only when a schedule skips whole forwards (TeaCache);
- for scored rules: the previous unit input ``[N, D]`` and per cached entry its age (steps since it was
  computed) and accumulated relative input drift.

At a step the router always runs. A routed (token, expert) pair whose expert is among the token's
cached experts (any slot) is a reuse candidate; the rule of that expert decides compute or reuse (the
online score ranks candidates); a newly routed pair is always computed. Outputs are combined with the
*current* gate weights by :func:`~moeca.models.runtime.combine_slots`, so a schedule that reuses
nothing reproduces the default runtime bit for bit. Caches reset on :meth:`reset` (the sampler calls
it), when the batch size of a context changes, and when a context's step does not advance.

Cost discipline: skipped units are not executed (counted in :attr:`counters`); rows are gathered and
scattered with ``index_select``/``index_copy_``; one host sync per block for the expert group sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from moeca.models.dit_moe import DiTMoEBlock, SwiGLU, modulate
from moeca.models.runtime import ForwardContext, Runtime, combine_slots, group_slots_by_expert
from moeca.policy.cost import UnitCosts
from moeca.policy.schedule import BlockRule, Rule, Schedule, ScheduleMismatch

from .partial_attention import partial_attention

EPS = 1e-12


# ----------------------------------------------------------------------------- counters
class ReplayCounters:
    """Rows actually executed per (step, block), and what full compute would have executed.

    Arrays are ``[num_steps, depth]`` int64: ``attn_q`` (query rows), ``attn_kv`` (K/V rows), ``shared``,
    ``expert`` ((token, expert) pairs), ``router``; ``tokens`` / ``pairs`` are the full-compute
    references (``N`` and ``N*k`` per visited block). ``samples`` counts rows fed to forwards (batched CFG
    counts both halves), ``skipped_forwards`` the forwards whose blocks were skipped whole.
    """

    FIELDS = ("attn_q", "attn_kv", "shared", "expert", "router", "tokens", "pairs")

    def __init__(self, num_steps: int, depth: int):
        for f in self.FIELDS:
            setattr(self, f, np.zeros((num_steps, depth), dtype=np.int64))
        self.samples = 0
        self.forwards = 0
        self.skipped_forwards = 0

    def totals(self) -> dict[str, int]:
        out = {f: int(getattr(self, f).sum()) for f in self.FIELDS}
        out.update(samples=self.samples, forwards=self.forwards, skipped_forwards=self.skipped_forwards)
        return out

    def flops(self, costs: UnitCosts) -> tuple[float, float]:
        """(FLOPs computed, FLOPs of full compute) over everything counted so far."""
        fixed = self.samples * costs.fixed_per_sample()
        done = (self.attn_q.sum() * costs.attn_q + self.attn_kv.sum() * costs.attn_kv
                + self.shared.sum() * costs.shared + self.expert.sum() * costs.expert
                + self.router.sum() * costs.router)
        full = (self.tokens.sum() * (costs.attn + costs.shared + costs.router) + self.pairs.sum() * costs.expert)
        return float(done + fixed), float(full + fixed)

    def reuse_fractions(self) -> dict[str, float]:
        """Share of rows reused (not computed) per unit kind over everything counted."""
        tok, pairs = max(int(self.tokens.sum()), 1), max(int(self.pairs.sum()), 1)
        return {"attn": 1 - self.attn_q.sum() / tok, "shared": 1 - self.shared.sum() / tok,
                "expert": 1 - self.expert.sum() / pairs}


# ----------------------------------------------------------------------------- cache state
def forecast(out: torch.Tensor, vel: torch.Tensor, t_out: torch.Tensor, step: int) -> torch.Tensor:
    """Linear forecast ``out + vel * (step - t_out)``: ``out/vel [n, D]``, ``t_out [n]`` float32 steps."""
    return torch.addcmul(out, vel, (step - t_out).to(out.dtype).unsqueeze(-1))


@dataclass
class _TokenCache:
    """One unit's per-token cache: output ``[N, D]`` (or ``[B, T, D]``), age and accumulated input drift ``[N]``.

    With forecasting, also per row the step at which ``out`` was computed (``t_out [N]`` float32) and the
    velocity ``vel`` (same shape as ``out``): the change per step between the row's last two computed
    outputs (None until a second computation; zero for rows without one).
    """

    out: torch.Tensor | None = None
    age: torch.Tensor | None = None
    acc: torch.Tensor | None = None
    vel: torch.Tensor | None = None
    t_out: torch.Tensor | None = None

    def store(self, out: torch.Tensor, track: bool, step: int | None = None) -> None:
        """Every row computed now (``step`` given = keep the forecast history)."""
        n = out.numel() // out.shape[-1]
        if step is not None:
            if self.out is not None and self.out.shape == out.shape and self.t_out is not None:
                span = (step - self.t_out).clamp_min(1.0).to(out.dtype)
                self.vel = ((out - self.out).view(n, -1) / span.unsqueeze(-1)).view(out.shape)
            else:
                self.vel = None
            self.t_out = torch.full((n,), float(step), device=out.device)
        self.out = out
        if track:
            self.age = out.new_zeros(n, dtype=torch.float32)
            self.acc = out.new_zeros(n, dtype=torch.float32)

    def refresh(self, rows: torch.Tensor, values: torch.Tensor, step: int | None = None) -> None:
        """Rows ``[m]`` of the (flattened) output recomputed now as ``values [m, D]``; in place."""
        D = self.out.shape[-1]
        flat = self.out.view(-1, D)
        if step is not None and self.t_out is not None:
            if self.vel is None:
                self.vel = torch.zeros_like(self.out)
            span = (step - self.t_out.index_select(0, rows)).clamp_min(1.0).to(values.dtype).unsqueeze(-1)
            self.vel.view(-1, D).index_copy_(0, rows, (values - flat.index_select(0, rows)) / span)
            self.t_out.index_fill_(0, rows, float(step))
        flat.index_copy_(0, rows, values)
        if self.age is not None:
            self.age.index_fill_(0, rows, 0.0)
            self.acc.index_fill_(0, rows, 0.0)

    def reused(self, step: int | None = None) -> torch.Tensor:
        """The output to use now: the cache, or (``step`` given) its linear forecast to ``step``."""
        if step is None or self.vel is None:
            return self.out
        D = self.out.shape[-1]
        return forecast(self.out.view(-1, D), self.vel.view(-1, D), self.t_out, step).view(self.out.shape)

    def bump(self, drift: torch.Tensor | None) -> None:
        """One more step without recompute: age + 1, accumulated drift + this step's input drift."""
        if self.age is not None:
            self.age += 1
            if drift is not None:
                self.acc += drift

    def score(self, cfg) -> torch.Tensor:
        return self.acc * cfg.drift_weight + self.age * cfg.staleness_weight

    def nbytes(self) -> int:
        return _nbytes(self.out, self.age, self.acc, self.vel, self.t_out)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class _ExpertCache:
    """Routed experts: ids ``[N, k]``, unweighted outputs ``[N*k, D]``, age/acc ``[N*k]``; with
    forecasting also ``vel [N*k, D]`` and ``t_out [N*k]`` (as in :class:`_TokenCache`; a newly routed
    pair has zero velocity)."""

    ids: torch.Tensor | None = None
    out: torch.Tensor | None = None
    age: torch.Tensor | None = None
    acc: torch.Tensor | None = None
    vel: torch.Tensor | None = None
    t_out: torch.Tensor | None = None

    def nbytes(self) -> int:
        return _nbytes(self.ids, self.out, self.age, self.acc, self.vel, self.t_out)


@dataclass
class _BlockState:
    attn: _TokenCache = field(default_factory=_TokenCache)
    shared: _TokenCache = field(default_factory=_TokenCache)
    moe: _TokenCache = field(default_factory=_TokenCache)
    experts: _ExpertCache = field(default_factory=_ExpertCache)
    attn_in_prev: torch.Tensor | None = None
    attn_in_prev_norm: torch.Tensor | None = None
    moe_in_prev: torch.Tensor | None = None
    moe_in_prev_norm: torch.Tensor | None = None

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.attn_in_prev, self.moe_in_prev, self.attn_in_prev_norm,
                                                          self.moe_in_prev_norm) if t is not None)
        return self.attn.nbytes() + self.shared.nbytes() + self.moe.nbytes() + self.experts.nbytes() + extra


@dataclass
class _ContextState:
    """Everything cached for one CFG context (``none``, ``batched``, ``cond`` or ``uncond``)."""

    batch: int
    blocks: list[_BlockState]
    last_step: int = -1
    model_prev: torch.Tensor | None = None
    model_acc: float = 0.0
    residual: torch.Tensor | None = None

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.model_prev, self.residual) if t is not None)
        return sum(b.nbytes() for b in self.blocks) + extra


def _expert_plan(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list]:
    """All pairs of ``topk_idx [N, k]`` grouped by expert: ``(order [N*k] slots sorted by expert, plan)``
    with ``plan = [(expert, start, count)]`` for the experts with pairs (one host sync)."""
    flat_idx = topk_idx.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)
    plan, start = [], 0
    for e, n_e in enumerate(torch.bincount(flat_idx, minlength=num_experts).tolist()):
        if n_e:
            plan.append((e, start, n_e))
        start += n_e
    return order, plan


def _plan_slots(order: torch.Tensor, plan: list, total: int) -> torch.Tensor:
    """The slots ``order[start:start + m]`` of every ``(expert, start, m)`` in ``plan``, concatenated
    ``[total]`` (built on the device, no host round trip)."""
    if not plan:
        return order[:0]
    pm = torch.tensor([[p, m] for _, p, m in plan], device=order.device)
    offset = pm[:, 0] - (torch.cumsum(pm[:, 1], 0) - pm[:, 1])                     # start - (slots before)
    pos = torch.repeat_interleave(offset, pm[:, 1], output_size=total) + torch.arange(total, device=order.device)
    return order.index_select(0, pos)


_MODE_CODE = {"always": 0, "never": 1, "fraction": 2, "threshold": 3}
_SCORE_CAP = 1e5       # scores are clamped here for the sort key
_FORCED = 2e5          # priority of a newly routed pair (always computed first)
_KEY_STRIDE = 1e6      # sort key = expert * stride - priority (exact in float64)


# ----------------------------------------------------------------------------- runtime
class ReplayRuntime(Runtime):
    """Runtime that computes or reuses each unit as ``schedule`` says (see the module docstring).

    Use ``with model.use_runtime(ReplayRuntime(schedule)): sample(model, sampler_cfg, labels)``.
    ``counters`` holds the executed rows; ``peak_cache_bytes`` the largest cache footprint seen.
    """

    grouped_gemm: bool = True
    """Compute the recomputed (token, expert) pairs of a block in one padded batched GEMM over its experts
    (stacked copies of the expert weights, at most ``STACK_LIMIT_BYTES`` in all); False = one call per expert."""
    STACK_LIMIT_BYTES: int | None = None
    """Bound on the stacked copies (None: a quarter of the GPU's memory on CUDA, 512 MiB elsewhere)."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        depth = schedule.model.depth
        self.counters = ReplayCounters(schedule.num_steps, depth)
        self.peak_cache_bytes = 0
        self._contexts: dict[str, _ContextState] = {}
        self._checked_config = None
        # which blocks need drift tracking / a whole-MoE cache (decided once from the schedule)
        self._track_attn = [self._scored(b, "attn") for b in range(depth)]
        self._track_moe = [self._scored(b, "moe") or self._scored(b, "shared") or self._scored(b, "expert")
                           for b in range(depth)]
        self._keep_moe = [any(schedule.steps[s].blocks[b].moe.mode != "always"
                              for s in range(schedule.num_steps) if not schedule.is_sync(s)) for b in range(depth)]
        self._uses_model_skip = schedule.uses_model_skip
        self._forecast = schedule.forecast == "linear"
        self._expert_rule_tensors: dict[tuple[int, int, torch.device], tuple] = {}
        self._row_bases: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._cs: _ContextState | None = None
        self._ctx: ForwardContext | None = None
        self._reused: list[tuple[str, int, torch.Tensor]] = []
        self._stacks: dict[int, tuple] = {}   # block -> ((weight ptr, dtype), bytes, stack or None)
        self._stack_bytes = 0

    def _scored(self, block: int, kind: str) -> bool:
        cfg = self.schedule.score(kind)
        return self.schedule.uses_scores(block, kind) and (cfg.drift_weight > 0 or cfg.staleness_weight > 0)

    # -- lifecycle ---------------------------------------------------------------------------
    def reset(self) -> None:
        self._contexts.clear()
        self._cs = None
        self._ctx = None
        self._reused = []

    def cache_bytes(self) -> int:
        """Bytes currently held by all caches of all CFG contexts."""
        return sum(cs.nbytes() for cs in self._contexts.values())

    def begin_forward(self, model, ctx: ForwardContext | None, x_tokens: torch.Tensor) -> None:
        if ctx is None:
            raise ValueError("the replay runtime needs a ForwardContext (step, num_steps, cfg_branch) on every "
                             "forward; sample with moeca.models.samplers.sample or pass ctx= to the model")
        if ctx.num_steps != self.schedule.num_steps:
            raise ScheduleMismatch(f"schedule field sampler.num_steps: the schedule has {self.schedule.num_steps} "
                                   f"steps but the sampler runs {ctx.num_steps}; derive a schedule for this step count")
        if not 0 <= ctx.step < ctx.num_steps:
            raise ValueError(f"ForwardContext.step {ctx.step} is outside 0..{ctx.num_steps - 1}")
        if model.config is not self._checked_config:  # configs are frozen: check each one once
            self.schedule.check_compatible(model.config)
            self._checked_config = model.config
        B = x_tokens.shape[0]
        cs = self._contexts.get(ctx.cfg_branch)
        if cs is None or cs.batch != B or ctx.step <= cs.last_step:
            cs = _ContextState(batch=B, blocks=[_BlockState() for _ in range(len(model.blocks))])
            self._contexts[ctx.cfg_branch] = cs
        cs.last_step = ctx.step
        self._cs, self._ctx = cs, ctx
        self._reused = []
        self.counters.samples += B
        self.counters.forwards += 1

    def end_forward(self, model, ctx: ForwardContext | None) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())
        self._reused = []

    def _check_finite(self, out: torch.Tensor) -> None:
        """One host sync per forward: if the blocks' output is not finite and a cached tensor reused in
        this forward holds NaN/Inf, stop and name it (a non-finite *computed* output is left to the
        sampler's own check)."""
        if not self._reused or bool(torch.isfinite(out.detach().sum())):
            return
        for unit, block, t in self._reused:
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                where = "the whole-model residual cache" if block < 0 else f"the cached {unit} output of block {block}"
                raise FloatingPointError(
                    f"replay: {where} holds {bad} NaN/Inf values and was reused at step {self._ctx.step} (CFG "
                    f"context {self._ctx.cfg_branch!r}); reuse stops here. Check the model weights and dtype "
                    "(float32 is safest) or use a schedule that refreshes this unit")

    # -- helpers -----------------------------------------------------------------------------
    def _rule(self, block_index: int) -> BlockRule:
        return self.schedule.rule(self._ctx.step, block_index)

    def _state(self, block) -> _BlockState:
        return self._cs.blocks[block.index]

    @staticmethod
    def _drift(st: _BlockState, unit: str, cur: torch.Tensor) -> torch.Tensor | None:
        """Per-row relative L2 change of a unit's input since the previous step -> ``[N]`` float32.

        Remembers ``cur`` (and its row norms, so each norm is computed once) in ``st``; None at the
        first step or after a shape change.
        """
        prev, prev_norm = getattr(st, f"{unit}_in_prev"), getattr(st, f"{unit}_in_prev_norm")
        cur_norm = cur.float().norm(dim=-1).reshape(-1)
        setattr(st, f"{unit}_in_prev", cur)
        setattr(st, f"{unit}_in_prev_norm", cur_norm)
        if prev is None or prev.shape != cur.shape:
            return None
        return (cur - prev).float().norm(dim=-1).reshape(-1) / (prev_norm + EPS)

    @property
    def _fc(self) -> int | None:
        """The current step when reused outputs are forecast, else None (plain reuse)."""
        return self._ctx.step if self._forecast else None

    def _count(self, name: str, block: int, n: int) -> None:
        getattr(self.counters, name)[self._ctx.step, block] += n

    # -- whole-model skip ----------------------------------------------------------------------
    def run_blocks(self, model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cs, step = self._cs, self._ctx.step
        if not self._uses_model_skip:
            out = self._blocks(model, x, c)
            self._check_finite(out)
            return out
        mode = "compute" if self.schedule.is_sync(step) else self.schedule.steps[step].model
        skip = False
        if self.schedule.model_skip is not None:  # change indicator, tracked on every forward (computed or not)
            m = model.blocks[0].attention_input(x, c)
            prev, cs.model_prev = cs.model_prev, m
            if mode == "adaptive" and prev is not None and prev.shape == m.shape and cs.residual is not None \
                    and cs.residual.shape == x.shape:
                r = float(((m - prev).abs().mean() / (prev.abs().mean() + EPS)).item())
                cs.model_acc += self.schedule.model_skip.rescale(r)
                skip = cs.model_acc < self.schedule.model_skip.threshold
        if mode == "reuse":
            skip = cs.residual is not None and cs.residual.shape == x.shape
        if skip:
            N = x.shape[0] * x.shape[1]
            self.counters.tokens[step] += N
            self.counters.pairs[step] += N * model.config.top_k
            self.counters.skipped_forwards += 1
            self._reused.append(("whole-model residual", -1, cs.residual))
            out = x + cs.residual
            self._check_finite(out)
            return out
        cs.model_acc = 0.0
        out = self._blocks(model, x, c)
        self._check_finite(out)
        cs.residual = out - x
        return out

    def _blocks(self, model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """All blocks. Where attention is reused whole and its input is not tracked, the block runs
        without ``norm1``/modulation (their only consumer is attention): the same arithmetic as
        :meth:`DiTMoEBlock.forward` with the cached attention output, minus the dead work."""
        for block in model.blocks:
            bi = block.index
            cache = self._cs.blocks[bi].attn
            if (not self._track_attn[bi] and cache.out is not None and cache.out.shape == x.shape
                    and isinstance(block, DiTMoEBlock) and self._rule(bi).attn.mode == "never"):
                shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
                self._count("tokens", bi, x.shape[0] * x.shape[1])
                cached = cache.reused(self._fc)
                self._reused.append(("attention", bi, cached))
                x = x + gate_msa.unsqueeze(1) * cached
                x = x + gate_mlp.unsqueeze(1) * self.moe(block, modulate(block.norm2(x), shift_mlp, scale_mlp))
            else:
                x = block(x, c, self)
        return x

    # -- attention -------------------------------------------------------------------------------
    def attention(self, block, x_mod: torch.Tensor) -> torch.Tensor:
        st, bi = self._state(block), block.index
        rule = self._rule(bi).attn
        B, T, D = x_mod.shape
        N = B * T
        self._count("tokens", bi, N)
        track = self._track_attn[bi]
        drift = None
        if track:
            drift = self._drift(st, "attn", x_mod)
        cache = st.attn
        if rule.mode == "always" or cache.out is None or cache.out.shape != x_mod.shape:
            out = block.attn(x_mod)
            self._count("attn_q", bi, N)
            self._count("attn_kv", bi, N)
            cache.store(out, track, self._fc)
            return out
        cache.bump(drift)
        n = 0
        if rule.mode == "fraction":
            n = min(T, math.ceil(rule.value * T))
        elif rule.mode == "threshold":
            score = cache.score(self.schedule.score("attn")).view(B, T)
            n = int((score > rule.value).sum(dim=1).max())
        if n == 0:
            out = cache.reused(self._fc)
            self._reused.append(("attention", bi, out))
            return out
        score = cache.score(self.schedule.score("attn")).view(B, T)
        idx = torch.topk(score, n, dim=1).indices                                  # [B, n]
        sub = partial_attention(block.attn, x_mod, idx)                            # [B, n, D]
        rows = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * T).reshape(-1)
        cache.refresh(rows, sub.reshape(-1, D), self._fc)
        self._count("attn_q", bi, B * n)
        self._count("attn_kv", bi, N)
        out = cache.reused(self._fc)
        if n < T:
            self._reused.append(("attention", bi, out))
        return out

    # -- MoE -------------------------------------------------------------------------------------
    def moe(self, block, h: torch.Tensor) -> torch.Tensor:
        st, bi = self._state(block), block.index
        rule = self._rule(bi)
        B, T, D = h.shape
        N = B * T
        flat = h.reshape(N, D)
        self._count("pairs", bi, N * block.moe.top_k)
        drift = None
        if self._track_moe[bi]:
            drift = self._drift(st, "moe", flat)
        if rule.moe.mode != "always" and st.moe.out is not None and st.moe.out.shape == (N, D):
            return self._moe_token_level(block, st, flat, rule.moe, drift).view(B, T, D)
        topk_idx, topk_weight = self.route(block, flat)
        self._count("router", bi, N)
        slot_out = self._routed(block, st, flat, topk_idx, rule.experts, drift)
        out = combine_slots(slot_out, topk_weight)
        if block.moe.shared_experts is not None:
            out = out + self._shared(block, st, flat, rule.shared, drift)
        if self._keep_moe[bi]:
            st.moe.store(out, self._track_moe[bi], self._fc)
        return out.view(B, T, D)

    def _full_moe_rows(self, block, rows: torch.Tensor) -> torch.Tensor:
        """Route + all routed experts + shared expert on ``rows [m, D]`` -> ``[m, D]`` (counted)."""
        bi, k = block.index, block.moe.top_k
        topk_idx, topk_weight = self.route(block, rows)
        slot_out = rows.new_empty(rows.shape[0] * k, rows.shape[1])
        self._compute_groups(block, rows, *_expert_plan(topk_idx, block.moe.num_experts), slot_out)
        out = combine_slots(slot_out.view(rows.shape[0], k, -1), topk_weight)
        m = rows.shape[0]
        self._count("router", bi, m)
        self._count("expert", bi, m * k)
        if block.moe.shared_experts is not None:
            out = out + self.shared_expert(block, rows)
            self._count("shared", bi, m)
        return out

    def _moe_token_level(self, block, st: _BlockState, flat: torch.Tensor, rule: Rule,
                         drift: torch.Tensor | None) -> torch.Tensor:
        """Token-level reuse of the whole MoE output (FORA / ToCa style)."""
        bi, N = block.index, flat.shape[0]
        cache = st.moe
        cache.bump(drift)
        # branch caches would be stale after a token-level step: drop them (next branch step recomputes)
        st.experts, st.shared = _ExpertCache(), _TokenCache()
        rows = self._select_rows(cache, rule, N, "moe")
        if rows is not None:
            cache.refresh(rows, self._full_moe_rows(block, flat.index_select(0, rows)), self._fc)
        out = cache.reused(self._fc)
        if rows is None or rows.numel() < N:
            self._reused.append(("MoE", bi, out))
        return out

    def _select_rows(self, cache: _TokenCache, rule: Rule, N: int, kind: str) -> torch.Tensor | None:
        """Rows to recompute under a ``never``/``fraction``/``threshold`` rule (None = reuse all)."""
        if rule.mode == "never":
            return None
        score = cache.score(self.schedule.score(kind))
        if rule.mode == "fraction":
            m = min(N, math.ceil(rule.value * N))
            return torch.topk(score, m).indices if m else None
        rows = torch.nonzero(score > rule.value).squeeze(1)
        return rows if rows.numel() else None

    def _shared(self, block, st: _BlockState, flat: torch.Tensor, rule: Rule, drift: torch.Tensor | None
                ) -> torch.Tensor:
        bi, N = block.index, flat.shape[0]
        cache = st.shared
        track = self._track_moe[bi]
        if rule.mode == "always" or cache.out is None or cache.out.shape != flat.shape:
            out = self.shared_expert(block, flat)
            self._count("shared", bi, N)
            cache.store(out, track, self._fc)
            return out
        cache.bump(drift)
        rows = self._select_rows(cache, rule, N, "shared")
        if rows is not None:
            cache.refresh(rows, self.shared_expert(block, flat.index_select(0, rows)), self._fc)
            self._count("shared", bi, int(rows.numel()))
        out = cache.reused(self._fc)
        if rows is None or rows.numel() < N:
            self._reused.append(("shared expert", bi, out))
        return out

    # -- routed experts ----------------------------------------------------------------------------
    def _expert_rules(self, bi: int, rules: tuple[Rule, ...], device: torch.device) -> tuple:
        key = (self._ctx.step, bi, device)
        got = self._expert_rule_tensors.get(key)
        if got is None:
            codes = torch.tensor([_MODE_CODE[r.mode] for r in rules], device=device)
            values = torch.tensor([r.value for r in rules], dtype=torch.float32, device=device)
            got = (codes, values, any(r.mode == "fraction" for r in rules),
                   any(r.scored for r in rules), all(r.mode == "always" for r in rules))
            self._expert_rule_tensors[key] = got
        return got

    def _routed(self, block, st: _BlockState, flat: torch.Tensor, topk_idx: torch.Tensor,
                rules: tuple[Rule, ...], drift: torch.Tensor | None) -> torch.Tensor:
        """Unweighted outputs per (row, slot) ``[N, k, D]``: cached where the rules allow, else computed."""
        bi = block.index
        N, k = topk_idx.shape
        D = flat.shape[1]
        E = block.moe.num_experts
        cache = st.experts
        track = self._track_moe[bi]
        codes, values, any_fraction, any_scored, all_always = self._expert_rules(bi, rules, flat.device)
        fresh = cache.ids is None or cache.ids.shape != topk_idx.shape
        if fresh or all_always:
            slot_out = flat.new_empty(N * k, D)
            if flat.is_cuda and self.grouped_gemm and self._stacked_experts(block) is not None:
                # on CUDA one padded batched GEMM instead of 3 launches per expert (equal up to rounding)
                self._compute_groups(block, flat, *_expert_plan(topk_idx, E), slot_out)
            else:  # the same operations as the default runtime (bit-identical full compute)
                for e, slots in group_slots_by_expert(topk_idx, E):
                    slot_out.index_copy_(0, slots, self.expert(block, e, flat.index_select(0, slots // k)))
            self._count("expert", bi, N * k)
            if self._forecast:  # velocity of persisting pairs from their last computed output
                cache.vel = None
                if not fresh:
                    src, has = self._match(cache.ids, topk_idx)
                    span = (self._ctx.step - cache.t_out.index_select(0, src)).clamp_min(1.0)
                    inv = torch.where(has, 1.0 / span, 0.0).to(slot_out.dtype).unsqueeze(-1)
                    cache.vel = (slot_out - cache.out.index_select(0, src)) * inv
                cache.t_out = torch.full((N * k,), float(self._ctx.step), device=flat.device)
            cache.ids, cache.out = topk_idx, slot_out
            if track:
                cache.age = flat.new_zeros(N * k, dtype=torch.float32)
                cache.acc = flat.new_zeros(N * k, dtype=torch.float32)
            return slot_out.view(N, k, D)

        flat_idx = topk_idx.reshape(-1)                                             # [N*k]
        src, has = self._match(cache.ids, topk_idx)
        age = acc = None
        score = torch.zeros(N * k, device=flat.device)
        if track:
            age = cache.age.index_select(0, src) + 1
            acc = cache.acc.index_select(0, src)
            if drift is not None:
                acc = acc + drift.repeat_interleave(k)
            if any_scored:
                cfg = self.schedule.score("expert")
                score = acc * cfg.drift_weight + age * cfg.staleness_weight
        # one sort puts, per expert, the forced pairs (newly routed) first, then candidates by score
        prio = torch.where(has, score.clamp(0.0, _SCORE_CAP), _FORCED).double()
        order = torch.argsort(flat_idx.double() * _KEY_STRIDE - prio, stable=True)
        per_e = torch.bincount(flat_idx, minlength=E)
        n_new = torch.bincount(flat_idx, weights=(~has).double(), minlength=E)
        n_cand = per_e.double() - n_new
        extra = torch.where(codes == 0, n_cand, torch.zeros_like(n_cand))
        if any_fraction:
            extra = torch.where(codes == 2, torch.ceil(values.double() * n_cand), extra)
        if any_scored:
            above = has & (score > values.index_select(0, flat_idx))
            n_above = torch.bincount(flat_idx, weights=above.double(), minlength=E)
            extra = torch.where(codes == 3, n_above, extra)
        counts, budget = torch.stack([per_e.double(), n_new + extra]).tolist()    # the one host sync
        slot_out = cache.out.index_select(0, src)
        plan, start = [], 0                    # (expert, first position in order, pairs computed now)
        for e in range(E):
            n_e, m_e = int(counts[e]), int(budget[e])
            if m_e:
                plan.append((e, start, m_e))
            start += n_e
        computed = sum(m for _, _, m in plan)
        all_slots = _plan_slots(order, plan, computed)                              # [computed]
        old = slot_out.index_select(0, all_slots) if self._forecast and computed else None
        self._compute_groups(block, flat, order, plan, slot_out)
        self._count("expert", bi, computed)
        used = slot_out
        if self._forecast:
            step = self._ctx.step
            t_out = cache.t_out.index_select(0, src)
            vel = cache.vel.index_select(0, src) if cache.vel is not None else torch.zeros_like(slot_out)
            if computed:  # new velocity of recomputed pairs; newly routed pairs get none
                span = (step - t_out.index_select(0, all_slots)).clamp_min(1.0)
                inv = torch.where(has.index_select(0, all_slots), 1.0 / span, 0.0).to(old.dtype).unsqueeze(-1)
                vel.index_copy_(0, all_slots, (slot_out.index_select(0, all_slots) - old) * inv)
                t_out.index_fill_(0, all_slots, float(step))
            cache.vel, cache.t_out = vel, t_out
        if self._forecast:
            used = forecast(slot_out, cache.vel, cache.t_out, self._ctx.step)
        if computed < N * k:
            self._reused.append(("routed-expert", bi, used))
        if track:
            compute = torch.zeros(N * k, dtype=torch.bool, device=flat.device).index_fill_(0, all_slots, True)
            zero = torch.zeros((), device=flat.device)
            cache.age = torch.where(compute, zero, age)
            cache.acc = torch.where(compute, zero, acc)
        cache.ids, cache.out = topk_idx, slot_out
        return used.view(N, k, D)

    def _compute_groups(self, block, flat: torch.Tensor, order: torch.Tensor, plan: list, dest: torch.Tensor) -> None:
        """Compute the planned (token, expert) pairs into ``dest [N*k, D]``: ``plan`` lists ``(expert, start,
        m_e)``, the slots ``order[start:start + m_e]`` of each expert (rows ``slot // k`` of ``flat``). One
        padded batched GEMM over the experts when :attr:`grouped_gemm` allows (few rows per expert, or many
        experts on a GPU, make per-expert calls launch-bound), else one call per expert."""
        k = block.moe.top_k
        if not plan:
            return
        stack = self._stacked_experts(block) if self.grouped_gemm and len(plan) > 1 else None
        if stack is None:
            for e, p, m in plan:
                slots = order[p:p + m]
                dest.index_copy_(0, slots, self.expert(block, e, flat.index_select(0, slots // k)))
            return
        m_max = max(m for _, _, m in plan)
        pem = torch.tensor([[p, m, e] for e, p, m in plan], device=flat.device)      # [G, 3]
        # padded positions in ``order`` [G, m_max]; short groups repeat their last pair (same value written)
        pos = pem[:, :1] + torch.minimum(torch.arange(m_max, device=flat.device).unsqueeze(0), pem[:, 1:2] - 1)
        slots = order.index_select(0, pos.view(-1))                                 # [G*m_max]
        h = flat.index_select(0, slots // k).view(len(plan), m_max, -1)            # [G, m_max, D]
        w_gate, w_up, w_down = stack                                               # [E, D, H], [E, D, H], [E, H, D]
        if len(plan) < w_gate.shape[0]:
            w_gate, w_up, w_down = (w.index_select(0, pem[:, 2]) for w in stack)
        y = torch.bmm(F.silu(torch.bmm(h, w_gate)) * torch.bmm(h, w_up), w_down)      # [G, m_max, D]
        dest.index_copy_(0, slots, y.view(-1, y.shape[-1]))

    def _stacked_experts(self, block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Routed SwiGLU expert weights of ``block`` stacked for :meth:`_compute_groups` (built once per
        block; None for other expert types or when all stacks would exceed ``STACK_LIMIT_BYTES``)."""
        experts = block.moe.experts
        w = experts[0].gate_proj.weight if isinstance(experts[0], SwiGLU) else None
        key = None if w is None else (w.data_ptr(), w.dtype)
        got = self._stacks.get(block.index)
        if got is not None and got[0] == key:
            return got[2]                      # decided before for these weights: the stack, or None
        if got is not None:
            self._stack_bytes -= got[1]        # the weights moved or changed dtype: decide again
        self._stacks[block.index] = (key, 0, None)
        if w is None or not all(isinstance(e, SwiGLU) for e in experts):
            return None
        size = sum(p.numel() * p.element_size() for p in experts.parameters())
        limit = self.STACK_LIMIT_BYTES
        if limit is None:
            limit = torch.cuda.get_device_properties(w.device).total_memory // 4 if w.is_cuda else 512 * 2 ** 20
        if self._stack_bytes + size > limit:
            return None
        with torch.no_grad():
            stack = (torch.stack([e.gate_proj.weight.t() for e in experts]).contiguous(),
                     torch.stack([e.up_proj.weight.t() for e in experts]).contiguous(),
                     torch.stack([e.down_proj.weight.t() for e in experts]).contiguous())
        self._stack_bytes += size
        self._stacks[block.index] = (key, size, stack)
        return stack

    def _match(self, old_ids: torch.Tensor, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each new (row, slot) of ``topk_idx [N, k]``: is its expert among the row's cached experts
        ``old_ids [N, k]`` (``has [N*k]`` bool), and the flat old slot holding it (``src [N*k]``, ``row * k``
        where none). A row's experts are distinct, so at most one old slot matches."""
        N, k = topk_idx.shape
        src = self._row_base(N, k, topk_idx.device)                               # [N, k]: row * k
        has = torch.zeros_like(topk_idx, dtype=torch.bool)
        for j in range(k):
            m = old_ids[:, j:j + 1] == topk_idx                                    # [N, k]
            has |= m
            if j:
                src = src + m * j
        return src.reshape(-1), has.reshape(-1)

    def _row_base(self, N: int, k: int, device: torch.device) -> torch.Tensor:
        """``[N, k]`` int64 with ``row * k`` in every slot (cached per shape and device)."""
        key = (N, k, device)
        r = self._row_bases.get(key)
        if r is None:
            r = self._row_bases[key] = (torch.arange(N, device=device) * k).unsqueeze(1).expand(N, k).contiguous()
        return r
