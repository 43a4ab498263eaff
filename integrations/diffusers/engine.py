"""Following a moeca schedule on HiDream's units: what to compute, what to reuse (the policy's mechanism).

Per MoE block and step (the schedule's :class:`~moeca.policy.schedule.BlockRule`):

- ``attn`` -- the block's ``attn1`` (joint attention; both streams' outputs in a double-stream block):
  ``always`` computes, ``never`` forecasts the whole output;
- ``moe`` -- ``never`` forecasts the whole ``ff_i`` output (token-level, no router); ``always`` decides
  per branch:
- ``experts[e]`` -- routed expert ``e`` per (token, expert) pair, keyed by expert id (HiDream's top-k
  is unsorted): the router always runs, a newly routed pair is always computed, a cached pair is
  recomputed under ``always``, forecast under ``never``, and under ``fraction f`` / ``threshold x`` the
  cached pairs with the highest / above-``x`` score (accumulated input drift times ``drift_weight``
  plus ``staleness_weight`` x steps since computed) are recomputed; outputs are combined with the
  *current* gate weights;
- ``shared`` -- the shared expert per token, with the same modes; the dense text feed-forward
  (``ff_t``) of a double-stream block follows it whole (reused only under ``never``).

Synchronized refresh steps compute everything. A step whose rules compute everything runs the stock
arithmetic through moeca's dispatch (:func:`~.hidream.moe_full`), so the schedule ``none`` reproduces
the stock forward bit for bit. Caches are per CFG context (:class:`ContextCaches`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from moeca.models.dispatch import run_experts, run_routed
from moeca.policy.schedule import BlockRule, Schedule, ScheduleMismatch
from moeca.replay.state import StackProducts
from moeca.replay.units.stack import GATE_DEGREE, FoldRefresh, begin_fold, end_fold, fold_sum

from .cache import RowCache, WholeCache
from .hidream import Architecture, HiDreamBlock, UnitFlops, combine_in_expert_order, moe_full

EPS = 1e-12
FOLD_GATE_TOLERANCE = 0.05
"""Default largest relative L2 error of the gates' linear interpolation between two full refreshes, at the
forecast steps between them, for which the next interval's token-level steps fold (:meth:`ScheduleEngine.
_check_gates`). Measured: on moeca's trained demo model, extrapolating the gates linearly from two refreshes
misses by 0.1-1.1% (10 and 50 Euler steps); on HiDream's structure with random weights by 49-70%, more than
holding the last value does (a fold there costs about 5 dB against the exact gates)."""


@dataclass(frozen=True)
class Plan:
    """Static facts of a schedule: the blocks whose units are ever reused (so they are cached) and whose
    rules need the online score. ``linear``: forecast reused outputs linearly (``degree`` 1, else 0).
    ``stack_steps``: the steps that forecast attention and the whole MoE output of every block (token-level
    forecast steps: the stack's output is one sum, :meth:`ScheduleEngine.forward`); ``fold``: every step
    computes everything or is such a step, so every refresh is a full one and the sum can be folded
    (:mod:`moeca.replay.units.stack`)."""

    attn: frozenset[int]
    moe: frozenset[int]
    shared: frozenset[int]
    dense: frozenset[int]
    experts: frozenset[int]
    scored: frozenset[int]
    linear: bool
    stack_steps: frozenset[int] = frozenset()
    fold: bool = False

    @property
    def degree(self) -> int:
        return 1 if self.linear else 0

    @classmethod
    def of(cls, schedule: Schedule) -> "Plan":
        sets: dict[str, set[int]] = {k: set() for k in ("attn", "moe", "shared", "dense", "experts", "scored")}
        stack_steps, fold = set(), True
        for s, step in enumerate(schedule.steps):
            if schedule.is_sync(s):
                continue
            if all(r.attn.mode == "reuse" and r.moe.mode == "reuse" for r in step.blocks):
                stack_steps.add(s)
            elif not all(r.attn.mode == "always" and r.moe.mode == "always" and r.shared.mode == "always"
                         and all(e.mode == "always" for e in r.experts) for r in step.blocks):
                fold = False
            for b, rule in enumerate(step.blocks):
                for name, r in (("attn", rule.attn), ("moe", rule.moe)):
                    if r.mode != "always":
                        sets[name].add(b)
                if rule.shared.mode == "reuse":
                    sets["dense"].add(b)
                if rule.moe.mode == "reuse":          # the whole MoE output is reused: no branch is read
                    continue
                if rule.shared.mode != "always":
                    sets["shared"].add(b)
                if any(r.mode != "always" for r in rule.experts):
                    sets["experts"].add(b)
                if rule.shared.scored or any(r.scored for r in rule.experts):
                    sets["scored"].add(b)
        return cls(**{k: frozenset(v) for k, v in sets.items()},
                   linear=schedule.forecast in ("linear", "taylor", "polynomial"),
                   stack_steps=frozenset(stack_steps), fold=fold and bool(stack_steps))


def check_supported(schedule: Schedule, depth: int, num_experts: int) -> None:
    """Refuse rules the HiDream adapter does not run; the message names the field."""
    if schedule.model_skip is not None or any(st.model != "compute" for st in schedule.steps):
        raise ScheduleMismatch("schedule field steps[].model: whole-model reuse (TeaCache-like) is not run on HiDream "
                               "by moeca's diffusers integration; derive a schedule with the default branch rules")
    if schedule.forecast in ("taylor", "polynomial") and schedule.forecast_order > 1:
        raise ScheduleMismatch(f"schedule field forecast_order: HiDream reuse forecasts none or linear (order 1); "
                               f"this schedule asks {schedule.forecast} order {schedule.forecast_order}")
    if schedule.token_selection.kind != "moeca_score":
        raise ScheduleMismatch(f"schedule field token_selection.kind: only moeca_score runs on HiDream, got "
                               f"{schedule.token_selection.kind!r}")
    for s, step in enumerate(schedule.steps):
        if len(step.blocks) != depth:
            raise ScheduleMismatch(f"schedule field steps[{s}].blocks: {len(step.blocks)} blocks, the model has {depth}")
        for b, rule in enumerate(step.blocks):
            for name, r in (("attn", rule.attn), ("moe", rule.moe)):
                if r.mode not in ("always", "reuse"):
                    raise ScheduleMismatch(f"schedule field steps[{s}].blocks[{b}].{name}: HiDream reuses {name} "
                                           f"whole (always or never), got {r.mode}")
            if len(rule.experts) != num_experts:
                raise ScheduleMismatch(f"schedule field steps[{s}].blocks[{b}].experts: {len(rule.experts)} rules, "
                                       f"the model has {num_experts} experts")


@dataclass
class ContextCaches:
    """State of one CFG context (diffusers ``CacheContext``): the step bookkeeping and every cache.

    ``next_step``: the step the next forward gets when the caller gives none; ``last_t``: the timestep of
    the last forward (a rise starts a new sampling call); ``batch``: rows of the last forward. The stack
    sum's state: ``stack`` the folded products (:class:`~moeca.replay.state.StackProducts`), ``fold_ok``
    whether the gates passed the last check (:meth:`ScheduleEngine._check_gates`), ``tembs`` the conditioning
    of the forecast steps since the last refresh, ``stack_in``
    the current forward's stack input ``[B, T, D]``, ``fold`` / ``fold_gates`` a refresh's fold in progress /
    its gates before the stack input is known; ``forward_flops`` / ``forward_pairs`` the full-compute FLOPs
    and routed pairs of the last forward that ran the blocks (what a stack step counts as skipped)."""

    next_step: int = 0
    last_t: float | None = None
    batch: int | None = None
    whole: dict[tuple[str, int], WholeCache] = field(default_factory=dict)
    pairs: dict[int, RowCache] = field(default_factory=dict)
    shared: dict[int, RowCache] = field(default_factory=dict)
    prev_in: dict[int, torch.Tensor] = field(default_factory=dict)
    drift_pairs: dict[int, torch.Tensor] = field(default_factory=dict)
    drift_tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    stack: StackProducts | None = None
    fold_ok: bool = True
    tembs: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    stack_in: torch.Tensor | None = None
    fold: FoldRefresh | None = None
    fold_gates: torch.Tensor | None = None
    forward_flops: float = 0.0
    forward_pairs: int = 0

    def reset(self, *args, **kwargs) -> None:
        """Forget every cache and the step count (a new sampling call)."""
        self.next_step, self.last_t, self.batch = 0, None, None
        self.clear()

    def clear(self) -> None:
        for d in (self.whole, self.pairs, self.shared, self.prev_in, self.drift_pairs, self.drift_tokens):
            d.clear()
        self.stack = self.stack_in = self.fold = self.fold_gates = None
        self.forward_flops, self.forward_pairs = 0.0, 0
        self.fold_ok = True
        self.tembs.clear()

    @property
    def nbytes(self) -> int:
        return (sum(c.nbytes for c in self.whole.values()) + sum(c.nbytes for c in self.pairs.values())
                + sum(c.nbytes for c in self.shared.values()) + (self.stack.nbytes() if self.stack else 0))


@dataclass
class ForwardWork:
    """What one forward executed, rows summed over its blocks (a block's rows: ``N_b = B * T_b``, the tokens
    its MoE sees), in the terms of the wall-clock cost model (:class:`~moeca.policy.wallclock.StepWork`):
    ``attn`` / ``shared`` rows computed, ``pairs`` routed pairs computed, ``reused`` rows forecast unit by
    unit, ``routed_blocks`` blocks whose router ran, ``stack_terms`` rows of the stack sum's work (a folded
    step: its terms times the mean rows per block; a refresh of a folding plan: ``2 (p + 1)`` per unit row
    and the stack's residual), ``pushed`` rows pushed into forecast histories, ``rows`` the rows of its
    blocks (``N_b`` summed)."""

    attn: float = 0.0
    shared: float = 0.0
    pairs: float = 0.0
    reused: float = 0.0
    routed_blocks: float = 0.0
    stack_terms: float = 0.0
    pushed: float = 0.0
    rows: float = 0.0


@dataclass
class Counters:
    """FLOPs run and FLOPs of full compute (:class:`~.hidream.UnitFlops`), summed over forwards, the
    routed pairs computed / routed, and the forwards that ran as one stack sum (``stack_forwards``), folded
    (``folded_forwards``); ``gate_error``: the largest error the fold's gate check measured
    (:meth:`ScheduleEngine._check_gates`); ``work``: each forward's :class:`ForwardWork` (when the engine
    records it)."""

    flops: float = 0.0
    full_flops: float = 0.0
    pairs: int = 0
    routed_pairs: int = 0
    forwards: int = 0
    stack_forwards: int = 0
    folded_forwards: int = 0
    gate_error: float = 0.0
    work: list[ForwardWork] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        """Full-compute FLOPs over FLOPs run (>= 1: the FLOPs speedup)."""
        return self.full_flops / self.flops if self.flops else math.nan

    def add(self, done: float, full: float) -> None:
        self.flops += done
        self.full_flops += full


def _patchify_square(latent: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> tokens ``[B, H/p * W/p, p * p * C]``: the reshapes and permute of
    ``HiDreamImageTransformer2DModel.patchify`` for a square latent (the same values), without the image
    sizes and ids it also builds (a host-to-device copy each)."""
    B, C, H, W = latent.shape
    x = latent.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def _unpatchify_square(x: torch.Tensor, H: int, W: int, p: int) -> torch.Tensor:
    """The final layer's ``[B, H/p * W/p, p * p * C]`` -> ``[B, C, H, W]``: ``unpatchify``'s inference branch
    for a square latent with the patch grid as host integers (the model's own reads them from a tensor, a
    host sync per sample)."""
    B, pH, pW = x.shape[0], H // p, W // p
    C = x.shape[-1] // (p * p)
    t = x[:, : pH * pW].reshape(B, pH, pW, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return t.reshape(B, C, pH * p, pW * p)


class ScheduleEngine:
    """Runs HiDream's units as ``schedule`` says for the context :meth:`begin` selects (see the module
    docstring). ``dispatch``: the routed-expert path (``"auto"``: the fastest for the device). ``blocks``:
    the transformer's MoE blocks (their gates serve the stack sum); ``stack``: run a step that forecasts
    every unit as one sum over the stack, no block running (False: block by block, each unit forecast by its
    hook); ``fold``: fold that sum once two full refreshes are folded, while the gates move linearly enough
    between refreshes (``fold_tolerance``, :meth:`_check_gates`; ``math.inf``: always) (False: the exact
    gates); ``record``:
    keep each forward's :class:`ForwardWork` in ``counters.work`` (the wall-clock calibration)."""

    def __init__(self, schedule: Schedule, arch: Architecture, dispatch: str = "auto",
                 blocks: tuple[HiDreamBlock, ...] = (), fold: bool = True, stack: bool = True,
                 record: bool = False, fold_tolerance: float = FOLD_GATE_TOLERANCE):
        check_supported(schedule, arch.depth, arch.num_experts)
        self.schedule, self.arch, self.dispatch = schedule, arch, dispatch
        self.plan = Plan.of(schedule)
        self.blocks = blocks
        self.stack = stack and bool(blocks)
        self.fold = fold and self.stack and self.plan.fold
        self.fold_tolerance = fold_tolerance
        self.counters = Counters()
        self.cs: ContextCaches | None = None
        self.step = 0
        self._flops: UnitFlops | None = None
        self._sync = False
        self._stacked = False
        self._snapshot = (0.0, 0)
        self.record = record
        self.work = ForwardWork()

    # -- lifecycle -----------------------------------------------------------------------------
    def begin(self, cs: ContextCaches, step: int | None, num_steps: int | None, batch: int,
              timestep: float | None) -> None:
        """Start a forward in context ``cs``: its step is ``step`` when the caller gives one (a diffusers
        ``CacheContext.step_index``), else counted; a new sampling call (step 0, a rising timestep, a new
        batch size) clears the context's caches."""
        S = self.schedule.num_steps
        if num_steps is not None and num_steps != S:
            raise ScheduleMismatch(f"schedule field sampler.num_steps: the schedule has {S} steps but the pipeline "
                                   f"runs {num_steps}; derive a schedule for this step count")
        if step is None:
            new_call = cs.next_step == 0 or (timestep is not None and cs.last_t is not None and timestep >= cs.last_t)
            if not new_call and cs.next_step >= S:
                if timestep is None:
                    new_call = True
                else:
                    raise ScheduleMismatch(f"schedule field sampler.num_steps: the schedule has {S} steps but this "
                                           f"sampling call made a forward at step {cs.next_step}; derive a schedule "
                                           "for this step count")
            step = 0 if new_call else cs.next_step
        elif not 0 <= step < S:
            raise ScheduleMismatch(f"schedule field sampler.num_steps: step_index {step} is outside the schedule's "
                                   f"0..{S - 1}")
        if step == 0 or batch != cs.batch or step < cs.next_step:   # a new call, or a step again / back
            cs.clear()
        cs.batch, cs.last_t, cs.next_step = batch, timestep, step + 1
        self.cs, self.step = cs, step
        self._sync = self.schedule.is_sync(step)
        self._flops = None
        self._stacked = False
        self._snapshot = (self.counters.full_flops, self.counters.routed_pairs)
        self.counters.forwards += 1
        self.work = ForwardWork()

    def end(self) -> None:
        cs = self.cs
        if cs is not None and not self._stacked:   # what a forward of the units counts (a stack step counts it again)
            cs.forward_flops = self.counters.full_flops - self._snapshot[0]
            cs.forward_pairs = self.counters.routed_pairs - self._snapshot[1]
        if cs is not None:
            cs.fold = cs.fold_gates = cs.stack_in = None
            if self.record:
                self.counters.work.append(self.work)
        self.cs = None

    # -- the whole stack: token-level forecast steps, and the fold's products at full refreshes -----------
    def forward(self, module: torch.nn.Module, call: dict, original: Callable[[], object]):
        """The transformer's forward (``call``: its arguments by name). On a step that forecasts every
        block's attention and MoE output (:attr:`Plan.stack_steps`) with every cache held, the stack's output
        is one sum and no block runs (:meth:`_stack_forward`); on a full refresh of a folding plan the units'
        gates are pushed for the fold first; otherwise the stock forward, whose units the hooks route."""
        cs = self.cs
        if cs is None:
            return original()
        if self.stack and self.step in self.plan.stack_steps and not self._sync:
            out = self._stack_forward(module, call)
            if out is not None:
                return out
            cs.stack = None       # a forecast step ran the blocks: the fold's products no longer match
        elif self.fold and self.step not in self.plan.stack_steps:
            cs.fold_gates = self._gates(self._temb(module, call))    # the fold begins once the stack's input is known
            self._check_gates(cs.fold_gates)
        return original()

    def stack_input(self, x: torch.Tensor) -> None:
        """The stack's input (``x_embedder``'s output ``[B, T, D]``, the image tokens)."""
        cs = self.cs
        if cs is None:
            return
        cs.stack_in = x
        if cs.fold_gates is not None:
            cs.stack, cs.fold = begin_fold(cs.stack, cs.fold_gates, float(self.step), x.shape[1], self.plan.degree)
            cs.fold_gates = None

    def stack_output(self, x: torch.Tensor) -> None:
        """The stack's output (``final_layer``'s input ``[B, T, D]``): closes a refresh's fold."""
        cs = self.cs
        if cs is not None and cs.fold is not None and cs.stack_in is not None:
            end_fold(cs.stack, x, cs.stack_in)
            self.work.stack_terms += self.work.rows / max(len(self.blocks), 1)
            cs.fold = None

    def _fold_block(self, block: HiDreamBlock) -> None:
        """A refreshed block's attention and MoE values (image rows) into the fold's products."""
        cs = self.cs
        T = cs.stack_in.shape[1]
        moe = cs.whole[("moe", block.index)]
        self.work.stack_terms += 2 * (cs.fold.degree + 1) * moe.shapes[0][0] * moe.shapes[0][1]
        for u, cache in ((2 * block.index, cs.whole[("attn", block.index)]), (2 * block.index + 1, cs.whole[("moe", block.index)])):
            cs.fold.add(u, lambda j, c=cache: c.level(0, j)[:, :T])

    def _check_gates(self, gates: torch.Tensor) -> None:
        """At a full refresh of a folding plan, before its gates ``[U, B, D]`` are pushed: whether the next
        interval's forecast steps may fold. The fold forecasts the gates linearly from the last two refreshes;
        the exact gates of the forecast steps since the last refresh (from their conditioning, kept in
        ``tembs``) are compared with the linear interpolation between that refresh's gates and these, and the
        fold runs while the worst relative L2 error is at most ``fold_tolerance`` (one host read per refresh).
        With no forecast step since the last refresh the previous verdict stands."""
        cs = self.cs
        sp = cs.stack
        if sp is not None and cs.tembs and sp.gates.uniform:
            before = sp.gates.host_ts[0]
            g0 = sp.gates.level(0).view(gates.shape)
            worst = gates.new_zeros(())
            for s, temb in cs.tembs:
                exact = self._gates(temb)
                line = torch.lerp(g0, gates, (s - before) / (self.step - before))
                worst = torch.maximum(worst, torch.linalg.vector_norm(exact - line) /
                                      (torch.linalg.vector_norm(exact) + EPS))
            error = float(worst)
            cs.fold_ok = error <= self.fold_tolerance           # always True for an infinite tolerance
            self.counters.gate_error = max(self.counters.gate_error, error)
        cs.tembs.clear()

    @staticmethod
    def _temb(module: torch.nn.Module, call: dict) -> torch.Tensor:
        """The conditioning ``temb [B, D]`` the transformer's blocks are modulated by (its own embedders)."""
        return module.t_embedder(call["timesteps"], call["hidden_states"].dtype) + module.p_embedder(call["pooled_embeds"])

    def _gates(self, temb: torch.Tensor) -> torch.Tensor:
        """Every unit's gate ``[U, B, D]`` float32 (``gate_msa_i`` then ``gate_mlp_i`` per block, chunks 2 and
        5 of its ``adaLN_modulation``): only those rows of each projection (views of its parameters)."""
        h = torch.nn.functional.silu(temb)
        D, out = self.arch.dim, []
        for block in self.blocks:
            proj = block.module.adaLN_modulation[-1]
            for chunk in (2, 5):
                rows = slice(chunk * D, (chunk + 1) * D)
                out.append(torch.nn.functional.linear(h, proj.weight[rows], proj.bias[rows]))
        return torch.stack(out).float()

    def _stack_forward(self, module: torch.nn.Module, call: dict):
        """The transformer's output on a step that forecasts every unit: patch embedding, then
        ``x + sum_u gate_u * F_u`` over the image rows of the ``U = 2 L`` units (attention and MoE output of
        every block; text rows never reach the output when no block computes), folded
        (:func:`~moeca.replay.units.stack.fold_sum`) once two full refreshes are folded, else with the exact
        gates; then the final layer. None when a cache lacks these rows (the blocks then run)."""
        cs = self.cs
        hs, masks = call["hidden_states"], call.get("hidden_states_masks")
        if masks is None and hs.dim() != 4:
            return None
        square = masks is None and hs.shape[-2] == hs.shape[-1]
        if square:              # the transformer's own patchify of a square latent, without its host reads
            tokens, img_sizes = _patchify_square(hs, int(module.config.patch_size)), None
        elif masks is None:
            tokens, _, img_sizes, _ = module.patchify(hs)
        else:
            tokens, img_sizes = hs, call.get("img_sizes")
        caches = [(cs.whole.get(("attn", b.index)), cs.whole.get(("moe", b.index))) for b in self.blocks]
        B = hs.shape[0]
        if not all(c is not None and c.n and c.shapes[0][0] == B for pair in caches for c in pair):
            return None
        x = module.x_embedder(tokens)
        T, D = x.shape[1], x.shape[2]
        if any(c.shapes[0][1] < T for pair in caches for c in pair):
            return None
        temb = self._temb(module, call)
        step, N = float(self.step), B * T
        sp = cs.stack
        rows = [c.shapes[0][0] * c.shapes[0][1] for _, c in caches]                # N_b of each block's MoE
        self.work.rows = float(sum(rows))
        if self.fold:
            cs.tembs.append((self.step, temb))
        if self.fold and cs.fold_ok and sp is not None and sp.refreshes > GATE_DEGREE and sp.prods.shape[2] == N:
            lag = caches[0][0].hists[0].weights(step) if self.plan.degree else [1.0]
            acc, terms = fold_sum(sp, x.reshape(N, D).float(), step, lag)
            acc = acc.view(B, T, D)
            self.counters.folded_forwards += 1
            self.work.stack_terms += terms * self.work.rows / len(rows)
        else:
            gates = self._gates(temb).unsqueeze(2)                                    # [U, B, 1, D]
            acc = x.to(torch.float32, copy=True)
            for b, pair in enumerate(caches):
                for i, cache in enumerate(pair):
                    acc.addcmul_(cache.hists[0].forecast(step).view(cache.shapes[0])[:, :T], gates[2 * b + i])
            self.work.reused += 2 * self.work.rows
        out = module.final_layer(acc.to(x.dtype), temb)
        if square and not (module.training and not module.config.force_inference_output):
            out = _unpatchify_square(out, hs.shape[-2], hs.shape[-1], int(module.config.patch_size))
        else:
            out = module.unpatchify(out, img_sizes, module.training)
        self._stacked = True
        self.counters.stack_forwards += 1
        self.counters.add(0.0, cs.forward_flops)
        self.counters.routed_pairs += cs.forward_pairs
        if call.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput  # local: the optional extra
            return Transformer2DModelOutput(sample=out)
        return (out,)

    def rule(self, block: HiDreamBlock) -> BlockRule:
        return self.schedule.rule(self.step, block.index)

    def _unit_flops(self, joint_tokens: int) -> UnitFlops:
        if self._flops is None:
            self._flops = UnitFlops.of(self.arch, joint_tokens)
        return self._flops

    # -- attention and the dense text feed-forward ------------------------------------------------
    def attention(self, block: HiDreamBlock, inputs: tuple[torch.Tensor, ...], compute: Callable[[], object]):
        """``attn1``'s output (a tensor, or the image and text outputs of a double-stream block).
        ``inputs``: the attention's token inputs ``[B, T_i, D]`` (they give the joint length)."""
        if self.cs is None:
            return compute()
        B, J = inputs[0].shape[0], sum(x.shape[1] for x in inputs)
        full = self._unit_flops(J).attn * B
        rule, key = self.rule(block).attn, ("attn", block.index)
        cache = self.cs.whole.get(key)
        rows = inputs[0].shape[0] * inputs[0].shape[1]          # the block's MoE rows (image, or all in a single block)
        if rule.mode == "reuse" and not self._sync and cache is not None and cache.n:
            self.counters.add(0.0, full)
            self.work.reused += rows
            out = cache.forecast(self.step, self.plan.linear, inputs[0].dtype)
            return out if len(out) > 1 else out[0]
        out = compute()
        self.counters.add(full, full)
        self.work.attn += rows
        if block.index in self.plan.attn:
            self.work.pushed += rows
            self.cs.whole.setdefault(key, WholeCache(self.plan.degree)).push(out if isinstance(out, tuple) else (out,), self.step)
        return out

    def dense(self, block: HiDreamBlock, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``ff_t`` on the text tokens ``x [B, T_t, D]`` of a double-stream block."""
        if self.cs is None:
            return compute()
        full = x.shape[0] * x.shape[1] * 6.0 * self.arch.dim * self.arch.dense_hidden
        key = ("dense", block.index)
        cache = self.cs.whole.get(key)
        if self.rule(block).shared.mode == "reuse" and not self._sync and cache is not None and cache.n:
            self.counters.add(0.0, full)
            return cache.forecast(self.step, self.plan.linear, x.dtype)[0]
        out = compute()
        self.counters.add(full, full)
        if block.index in self.plan.dense:
            self.cs.whole.setdefault(key, WholeCache(self.plan.degree)).push((out,), self.step)
        return out

    # -- the MoE ------------------------------------------------------------------------------
    def moe(self, block: HiDreamBlock, x: torch.Tensor) -> torch.Tensor:
        """``ff_i`` on ``x [B, T, D]`` -> ``[B, T, D]`` (routed + shared, before the block's ``gate_mlp``)."""
        if self.cs is None:
            return moe_full(block, x, self.dispatch).out
        B, T, D = x.shape
        N, bi, cs, a = B * T, block.index, self.cs, self.arch
        full = N * (a.top_k * 6.0 * D * a.expert_hidden + 6.0 * D * a.shared_hidden + 2.0 * D * a.num_experts)
        rule = self.rule(block)
        whole = cs.whole.get(("moe", bi))
        self.work.rows += N
        if rule.moe.mode == "reuse" and not self._sync and whole is not None and whole.n:
            self.counters.add(0.0, full)
            self.counters.routed_pairs += N * a.top_k
            self.work.reused += N
            return whole.forecast(self.step, self.plan.linear, x.dtype)[0]
        drift = self._drift(bi, x.reshape(N, D)) if bi in self.plan.scored else None
        computes_all = self._sync or (rule.shared.mode == "always" and all(r.mode == "always" for r in rule.experts))
        if computes_all or (bi not in cs.pairs and bi not in cs.shared):   # nothing cached yet
            res = moe_full(block, x, self.dispatch)
            out = res.out
            self._fill_caches(block, x, res, drift)
            self.counters.add(full, full)
            self.counters.pairs += N * a.top_k
            w = self.work
            w.shared, w.pairs, w.routed_blocks = w.shared + N, w.pairs + N * a.top_k, w.routed_blocks + 1
            w.pushed += N * a.top_k * (bi in self.plan.experts) + N * (bi in self.plan.shared)
        else:
            out = self._branches(block, x, rule, drift, full)
        self.counters.routed_pairs += N * a.top_k
        if bi in self.plan.moe:
            self.work.pushed += N
            cs.whole.setdefault(("moe", bi), WholeCache(self.plan.degree)).push((out,), self.step)
            if cs.fold is not None:
                self._fold_block(block)
        return out

    def _drift(self, bi: int, flat: torch.Tensor) -> torch.Tensor:
        """Relative change of each token's MoE input since the last forward, accumulated into the pair and
        token scores (float32 ``[N]``); 0 at a context's first forward."""
        cs, x = self.cs, flat.float()
        prev = cs.prev_in.get(bi)
        d = (torch.zeros(x.shape[0], device=x.device) if prev is None
             else torch.linalg.vector_norm(x - prev, dim=1) / (torch.linalg.vector_norm(prev, dim=1) + EPS))
        cs.prev_in[bi] = x
        if bi in cs.drift_pairs:
            cs.drift_pairs[bi].add_(d.unsqueeze(1))
            cs.drift_tokens[bi].add_(d)
        else:
            cs.drift_pairs[bi] = d.unsqueeze(1).repeat(1, self.arch.num_experts)
            cs.drift_tokens[bi] = d.clone()
        return d

    def _fill_caches(self, block: HiDreamBlock, x: torch.Tensor, res, drift) -> None:
        """After a full MoE compute: every routed pair and every shared output into the caches."""
        bi, cs = block.index, self.cs
        B, T, D = x.shape
        N, E, k = B * T, self.arch.num_experts, self.arch.top_k
        if bi in self.plan.experts:
            pc = cs.pairs.get(bi) or cs.pairs.setdefault(bi, RowCache(N * E, D, x.device))
            pc.push(self._pair_rows(res.ids).reshape(-1), res.slot_out.reshape(N * k, D), self.step)
        if bi in self.plan.shared:
            sc = cs.shared.get(bi) or cs.shared.setdefault(bi, RowCache(N, D, x.device))
            sc.push(torch.arange(N, device=x.device), res.shared.reshape(N, D), self.step)
        if drift is not None:
            cs.drift_pairs[bi].zero_()
            cs.drift_tokens[bi].zero_()

    def _pair_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each (token, slot) in a pair cache: ``token * E + expert`` -> ``[N, k]`` int64."""
        return torch.arange(ids.shape[0], device=ids.device).unsqueeze(1) * self.arch.num_experts + ids

    def _branches(self, block: HiDreamBlock, x: torch.Tensor, rule: BlockRule, drift, full: float) -> torch.Tensor:
        """Branch-level step: route, compute the newly routed pairs and the pairs the expert rules select,
        forecast the others, combine with the current gates; the shared expert per token."""
        bi, cs, a = block.index, self.cs, self.arch
        B, T, D = x.shape
        N, E, k = B * T, a.num_experts, a.top_k
        flat = x.reshape(N, D)
        ids, weights = block.moe.gate(flat)
        if bi not in self.plan.experts:       # only the shared expert is ever reused in this block
            routed = combine_in_expert_order(run_routed(block.moe, flat, ids, path=self.dispatch), ids, weights)
            return self._with_shared(block, x, rule, drift, full, routed.view(B, T, D), N * k)
        pair = self._pair_rows(ids)                                                        # [N, k]
        pc = cs.pairs.get(bi) or cs.pairs.setdefault(bi, RowCache(N * E, D, x.device))
        cached = pc.n[pair] > 0
        compute = ~cached
        for e, r in enumerate(rule.experts):
            if r.mode == "reuse":
                continue
            sel = cached & (ids == e)
            if r.mode == "always":
                compute |= sel
                continue
            score = self._score("expert", cs.drift_pairs[bi].view(-1)[pair], pc.s1[pair])
            compute |= self._select(r, sel, score)
        tok, slot = compute.nonzero(as_tuple=True)
        rows = pair[tok, slot]
        out_c = run_experts(block.moe, flat[tok], ids[tok, slot], path=self.dispatch)
        pc.push(rows, out_c, self.step)
        if drift is not None:
            cs.drift_pairs[bi].view(-1)[rows] = 0.0
        # every pair forecast in one gather, then the computed ones written over it (cheaper than two masks)
        slot_out = pc.forecast(pair.reshape(-1), self.step, self.plan.linear).to(x.dtype).view(N, k, D)
        slot_out[tok, slot] = out_c
        routed = combine_in_expert_order(slot_out, ids, weights).view(B, T, D)
        return self._with_shared(block, x, rule, drift, full, routed, int(tok.shape[0]))

    def _with_shared(self, block: HiDreamBlock, x: torch.Tensor, rule: BlockRule, drift, full: float,
                     routed: torch.Tensor, n_pairs: int) -> torch.Tensor:
        """``routed [B, T, D]`` plus the shared expert under its rule; counts the step's FLOPs."""
        a, D = self.arch, x.shape[2]
        shared, n_shared = self._shared(block, x, rule, drift)
        self.counters.pairs += n_pairs
        N, k, w = x.shape[0] * x.shape[1], a.top_k, self.work
        w.shared, w.pairs, w.routed_blocks = w.shared + n_shared, w.pairs + n_pairs, w.routed_blocks + 1
        w.reused += (N * k - n_pairs) + (N - n_shared)
        w.pushed += n_pairs * (block.index in self.plan.experts) + n_shared * (block.index in self.plan.shared)
        done = (x.shape[0] * x.shape[1] * 2.0 * D * a.num_experts + n_pairs * 6.0 * D * a.expert_hidden
                + n_shared * 6.0 * D * a.shared_hidden)
        self.counters.add(done, full)
        return routed + shared

    def _shared(self, block: HiDreamBlock, x: torch.Tensor, rule: BlockRule, drift) -> tuple[torch.Tensor, int]:
        """The shared expert per token under ``rule.shared`` -> (``[B, T, D]``, tokens computed)."""
        bi, cs = block.index, self.cs
        B, T, D = x.shape
        N = B * T
        sc = cs.shared.get(bi)
        r = rule.shared
        if r.mode == "always" or sc is None:
            out = block.moe.shared_experts(x)
            if bi in self.plan.shared:
                sc = sc or cs.shared.setdefault(bi, RowCache(N, D, x.device))
                sc.push(torch.arange(N, device=x.device), out.reshape(N, D), self.step)
            if drift is not None:
                cs.drift_tokens[bi].zero_()
            return out, N
        cached = sc.n > 0
        compute = ~cached
        if r.mode != "reuse":
            compute |= self._select(r, cached, self._score("shared", cs.drift_tokens[bi], sc.s1))
        elif bool(cached.all()):              # every token forecast: no gathers, no computed rows
            return sc.forecast_all(self.step, self.plan.linear).to(x.dtype).view(B, T, D), 0
        rows = compute.nonzero(as_tuple=True)[0]
        flat = x.reshape(N, D)
        out = torch.empty(N, D, dtype=x.dtype, device=x.device)
        if rows.numel():
            computed = block.moe.shared_experts(flat[rows])
            out[rows] = computed
            sc.push(rows, computed, self.step)
            if drift is not None:
                cs.drift_tokens[bi][rows] = 0.0
        reuse = (~compute).nonzero(as_tuple=True)[0]
        out[reuse] = sc.forecast(reuse, self.step, self.plan.linear).to(x.dtype)
        return out.view(B, T, D), int(rows.numel())

    def _score(self, kind: str, drift: torch.Tensor, computed_at: torch.Tensor) -> torch.Tensor:
        sc = self.schedule.score(kind)
        return sc.drift_weight * drift + sc.staleness_weight * (self.step - computed_at)

    @staticmethod
    def _select(rule, candidates: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Candidates (bool, any shape) a ``fraction``/``threshold`` rule recomputes."""
        if rule.mode == "threshold":
            return candidates & (score > rule.value)
        n = int(candidates.sum())
        m = math.ceil(rule.value * n)
        chosen = torch.zeros_like(candidates)
        if m:
            masked = torch.where(candidates, score, torch.full_like(score, -math.inf)).reshape(-1)
            chosen.view(-1)[masked.topk(m).indices] = True
        return chosen
