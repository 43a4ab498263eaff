"""The replay runtime: follows a :class:`~moeca.policy.schedule.Schedule` at the model's seams.

A thin orchestrator over the engine's parts (mechanism apart from policy):

- :mod:`.plan` -- static decisions taken once from the schedule (which units are ever reused, which are
  scored, the routed-expert rules as device tensors);
- :mod:`.state` -- per-CFG-context caches in buffers allocated at a context's first forward and updated
  in place; :mod:`.forecast` -- their float32 forecast history (the last computed values);
- :mod:`.units` -- attention, routed branches, per-token units (shared expert, whole MoE), whole-model
  skip, token selection hooks and the routed-expert dispatch;
- :mod:`.counters` -- what ran, per (step, block).

At a step the router always runs. A routed (token, expert) pair that was cached is a reuse candidate;
the rule of its expert decides compute or reuse; a newly routed pair is always computed. Outputs are
combined with the *current* gate weights, so a schedule that reuses nothing reproduces the default
runtime bit for bit. Caches reset on :meth:`reset` (the sampler calls it), when the batch size of a
context changes, and when a context's step does not advance.

Two paths, one result: the *host path* (default on the CPU) asks the host for the expert group sizes
once per block -- free on a CPU -- and runs exactly the selected rows; the *device path* (default on
CUDA; ``device_path=True`` forces it anywhere) has no host sync and static shapes inside the blocks
(grouped GEMM with device-side offsets; threshold rules computed over all rows and merged by mask), so
each step traces as one graph. Finiteness is checked on the host per forward on the host path and once
per sampling run (the last step) on the device path (``check_finite`` overrides).

Host and compiled code: everything that reads the step number runs in :meth:`ReplayRuntime.prepare_forward`
and :meth:`ReplayRuntime.finish_forward`, outside the compiled part of a forward. Inside, units read the
step's :class:`~.plan.StepKind` (one interned object per distinct set of rules), its rule tables and the
step number (:attr:`ReplayRuntime.step`: a 0-d tensor in compiled code), and record counts in a list the host side
files under the step. So ``--compile`` builds one graph per kind of step (e.g. first step, refresh,
forecast), and a forward that is compiled takes the device path by itself.
"""
from __future__ import annotations

import torch

from moeca.models.dit_moe import DiTMoEBlock, modulate
from moeca.models.runtime import ForwardContext, Runtime, combine_slots
from moeca.policy.schedule import BlockRule, Schedule, ScheduleMismatch

from .counters import ReplayCounters
from .plan import SchedulePlan, StepKind
from .state import BlockState, ContextState, RowCache
from .units.attention import reused_attention, run_attention
from .units.branch import block_ready, branch_block, routing_forecast, routing_ready
from .units.model_skip import run_with_model_skip
from .units.routed import all_pairs, run_routed
from .units.stack import fold_ready, forecast_folded, forecast_stack, refresh_folded, stack_ready
from .units.token import run_token_unit


class ReplayRuntime(Runtime):
    """Runtime that computes or reuses each unit as ``schedule`` says (see the module docstring).

    Use ``with model.use_runtime(ReplayRuntime(schedule)): sample(model, sampler_cfg, labels)``.
    ``counters`` holds the executed rows; ``peak_cache_bytes`` the largest cache footprint seen.

    device_path: True = the sync-free fixed-shape path, False = the host path, None = device path on
    CUDA only. check_finite: ``"forward"`` (a host check after every forward) or ``"run"`` (once, at the
    last step); None = per forward on the host path, per run on the device path. fold: run the stack
    forecast folded where the plan allows (:mod:`.units.stack`); False = the exact gates, unit by unit.
    lean: a branch-level forecast step (every expert ``never``, nothing scored) takes the lean path
    (:mod:`.units.branch`); False = the general selection path of :mod:`.units.routed` (the same numbers
    with more operators: the reference the lean path is tested against). A routing-aware step (``moe`` rule
    ``routing``) has one path, :func:`.units.branch.routing_forecast`, run block by block when ``lean`` is False.
    """

    def __init__(self, schedule: Schedule, device_path: bool | None = None, check_finite: str | None = None,
                 fold: bool = True, lean: bool = True):
        if check_finite not in (None, "forward", "run"):
            raise ValueError(f"check_finite must be 'forward', 'run' or None, got {check_finite!r}")
        super().__init__()
        self.schedule = schedule
        self.plan = SchedulePlan(schedule)
        self.fold = fold and self.plan.fold_stack
        self.lean = lean
        # a lean forecast block runs its MoE inline: only while the moe seam is this class's (a subclass that
        # overrides it sees every block's call)
        self._whole_blocks = type(self).moe is ReplayRuntime.moe
        self.counters = ReplayCounters(schedule.num_steps, schedule.model.depth)
        self.peak_cache_bytes = 0
        self._device_path_arg = device_path
        self._check_finite_arg = check_finite
        self.device_path = bool(device_path)
        self._contexts: dict[str, ContextState] = {}
        self._checked_config = None
        self._cs: ContextState | None = None
        self._ctx: ForwardContext | None = None
        self._reused: list[tuple[str, int, "RowCache | torch.Tensor"]] = []
        self._counts: list[tuple[str, int, "int | torch.Tensor"]] = []
        self._skipped = 0
        self.kind: StepKind | None = None
        self.step_value: torch.Tensor | None = None
        self.expert_codes = self.expert_values = None

    # -- lifecycle ---------------------------------------------------------------------------
    def reset(self) -> None:
        self._contexts.clear()
        self._cs = None
        self._ctx = None
        self._reused = []
        self._counts = []

    def cache_bytes(self) -> int:
        """Bytes currently held by all caches of all CFG contexts."""
        return sum(cs.nbytes() for cs in self._contexts.values())

    def prepare_forward(self, model, ctx: ForwardContext | None, x: torch.Tensor) -> None:
        """Host side of a forward (outside a compiled forward): checks, the CFG context's state, the kind
        of step and its rule tables, the step number into :attr:`step_value`."""
        if ctx is None:
            raise ValueError("the replay runtime needs a ForwardContext (step, num_steps, cfg_branch) on every "
                             "forward; sample with moeca.diffusion.samplers.sample or pass ctx= to the model")
        if ctx.num_steps != self.schedule.num_steps:
            raise ScheduleMismatch(f"schedule field sampler.num_steps: the schedule has {self.schedule.num_steps} "
                                   f"steps but the sampler runs {ctx.num_steps}; derive a schedule for this step count")
        if not 0 <= ctx.step < ctx.num_steps:
            raise ValueError(f"ForwardContext.step {ctx.step} is outside 0..{ctx.num_steps - 1}")
        if model.config is not self._checked_config:  # configs are frozen: check each one once
            self.schedule.check_compatible(model.config)
            self._checked_config = model.config
        device = x.device
        if self._device_path_arg is not None:
            self.device_path = self._device_path_arg
        else:  # a compiled forward must not ask the host anything: it takes the device path
            self.device_path = device.type == "cuda" or getattr(model, "compiled_core", None) is not None
        self.dispatch = "grouped" if self.device_path else "auto"
        B = x.shape[0]
        cs = self._contexts.get(ctx.cfg_branch)
        if cs is None or cs.batch != B or ctx.step <= cs.last_step:
            cs = ContextState(batch=B, blocks=[BlockState() for _ in range(len(model.blocks))])
            self._contexts[ctx.cfg_branch] = cs
        cs.last_step = ctx.step
        self._cs, self._ctx = cs, ctx
        self.kind = self.plan.kind(ctx.step)
        self.expert_codes, self.expert_values = self.plan.expert_tables(self.kind, device)
        if self.step_value is None or self.step_value.device != device:
            self.step_value = torch.zeros((), dtype=torch.float32, device=device)
        self.step_value.fill_(float(ctx.step))
        self._reused = []
        self._counts = []
        self.counters.samples += B
        self.counters.forwards += 1

    def finish_forward(self, model, ctx: ForwardContext | None, out: torch.Tensor) -> None:
        """Host side after a forward: the counts of this step, the cache footprint, the finiteness check."""
        step = self._ctx.step
        for name, block, n in self._counts:
            self.counters.add(name, step, block, n)
        self._counts = []
        self.counters.skipped_forwards += self._skipped
        self._skipped = 0
        if not self.kind.forecast_all:   # a step that forecasts every unit only reads the caches
            self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())
        self._check_finite(out)
        self._reused = []

    # -- helpers the units use --------------------------------------------------------------------
    @property
    def step(self) -> "torch.Tensor | float":
        """The current step number: in compiled code a 0-d float32 tensor on the model's device (so the graph
        is not specialised on it), in eager code the number itself (so forecast weights are host arithmetic,
        :meth:`~.forecast.History.weights`)."""
        return self.step_value if torch.compiler.is_compiling() else float(self._ctx.step)

    @property
    def batch(self) -> int:
        return self._cs.batch

    @property
    def context(self) -> ContextState:
        return self._cs

    def rule(self, block_index: int) -> BlockRule:
        return self.kind.rules[block_index]

    def count(self, name: str, block: int, n: "int | torch.Tensor") -> None:
        """Rows of ``name`` run at ``block`` in this forward (``n`` may be a device scalar: no sync)."""
        self._counts.append((name, block, n))

    def count_skipped_forward(self, rows: int, pairs: int, blocks: range) -> None:
        """A forward whose ``blocks`` were skipped (all of them, or First-Block Cache's middle): their
        full-compute references."""
        for block in blocks:
            self._counts.append(("tokens", block, rows))
            self._counts.append(("pairs", block, pairs))
        self._skipped += 1

    def note_reused(self, unit: str, block: int, cache: "RowCache | torch.Tensor") -> None:
        """Remember a cache reused in this forward (named if the forward's output is not finite)."""
        self._reused.append((unit, block, cache))

    # -- finiteness ----------------------------------------------------------------------------
    def _check_finite(self, out: torch.Tensor) -> None:
        """If the forward's output is not finite and a cache reused in this forward holds NaN/Inf, stop and
        name it (a non-finite *computed* output is left to the sampler's own check). One host sync."""
        mode = self._check_finite_arg or ("run" if self.device_path else "forward")
        if not self._reused:
            return
        if mode == "run" and self._ctx.step != self._ctx.num_steps - 1:
            return
        if bool(torch.isfinite(out.detach().sum())):
            return
        for unit, block, cache in self._reused:
            t = cache if isinstance(cache, torch.Tensor) else cache.hist.vals
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                where = "the whole-model residual cache" if block < 0 else f"the cached {unit} output of block {block}"
                raise FloatingPointError(
                    f"replay: {where} holds {bad} NaN/Inf values and was reused at step {self._ctx.step} (CFG "
                    f"context {self._ctx.cfg_branch!r}); reuse stops here. Check the model weights and dtype "
                    "(float32 is safest) or use a schedule that refreshes this unit")

    # -- seams -----------------------------------------------------------------------------------
    def run_blocks(self, model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.plan.uses_model_skip:
            return run_with_model_skip(self, model, x, c, lambda h: self._blocks(model, h, c))
        return self._blocks(model, x, c)

    def _blocks(self, model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """All blocks. A step that forecasts every unit of every block runs as one sum over the stack
        (:mod:`.units.stack`), folded where the plan allows; after a full refresh of such a plan the folded
        state is rebuilt. Where attention is reused whole and its input is not tracked, the block runs
        without ``norm1``/modulation (their only consumer is attention): the same arithmetic as
        :meth:`DiTMoEBlock.forward` with the cached attention output, minus the dead work."""
        rows = x.shape[0] * x.shape[1]
        if stack_ready(self, model, rows):
            return (forecast_folded if fold_ready(self, rows) else forecast_stack)(self, model, x, c)
        if self.fold and self.kind.full:
            return refresh_folded(self, model, x, c)
        for block in model.blocks:
            st = self._cs.blocks[block.index]
            if self._whole_blocks and block_ready(self, block, st, rows):
                x = branch_block(self, block, st, x, c)
                continue
            cached = reused_attention(self, block, self._cs.blocks[block.index], x.shape, x.dtype) \
                if isinstance(block, DiTMoEBlock) else None
            if cached is None:
                x = block(x, c, self)
                continue
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * cached
            x = x + gate_mlp.unsqueeze(1) * self.moe(block, modulate(block.norm2(x), shift_mlp, scale_mlp))
        return x

    def attention(self, block, x_mod: torch.Tensor) -> torch.Tensor:
        return run_attention(self, block, self._cs.blocks[block.index], x_mod)

    def moe(self, block, h: torch.Tensor) -> torch.Tensor:
        st, bi = self._cs.blocks[block.index], block.index
        rule = self.rule(bi)
        B, T, D = h.shape
        N = B * T
        flat = h.reshape(N, D)
        self.count("pairs", bi, N * block.moe.top_k)
        drift = st.moe_drift.update(flat) if self.plan.track_moe[bi] else None
        if rule.moe.mode == "routing" and routing_ready(self, block, st, N):
            topk_idx, topk_w = self.route(block, flat)
            self.count("router", bi, N)
            return routing_forecast(self, block, st, flat, topk_idx, topk_w).to(h.dtype).view(B, T, D)
        if rule.moe.mode not in ("always", "routing") and st.moe.valid and st.moe.hist.rows == N:
            # token-level reuse of the whole MoE output; branch caches would be stale after it
            st.experts.valid = st.shared.valid = False
            return run_token_unit(self, bi, "moe", st.moe, rule.moe, flat, lambda rows: self._full_moe_rows(block, rows),
                                  True, self.plan.track_moe[bi], drift, lambda n: None).view(B, T, D)
        topk_idx, topk_w = self.route(block, flat)
        self.count("router", bi, N)
        out = run_routed(self, block, st, flat, topk_idx, topk_w, drift)
        if block.moe.shared_experts is not None:
            out = out + run_token_unit(self, bi, "shared", st.shared, rule.shared, flat,
                                       lambda rows: self.shared_expert(block, rows), self.plan.shared_reused[bi],
                                       self.plan.track_moe[bi], drift, lambda n: self.count("shared", bi, n))
        if self.plan.moe_token_level[bi]:
            st.moe.ensure(self.plan.degree, N, D, self.plan.track_moe[bi], flat.device,
                         self.plan.forecast_kind)
            st.moe.hist.push_all(out, self.step)
            st.moe.computed(None)
            st.moe.valid = True
            self.count("forecast", bi, N * self.plan.degree)
        return out.view(B, T, D)

    def _full_moe_rows(self, block, rows: torch.Tensor) -> torch.Tensor:
        """Route + all routed experts + shared expert on ``rows [m, D]`` -> ``[m, D]`` (counted)."""
        bi, k = block.index, block.moe.top_k
        m = rows.shape[0]
        topk_idx, topk_w = self.route(block, rows)
        out = combine_slots(all_pairs(self, block, rows, topk_idx), topk_w)
        self.count("router", bi, m)
        self.count("expert", bi, m * k)
        if block.moe.shared_experts is not None:
            out = out + self.shared_expert(block, rows)
            self.count("shared", bi, m)
        return out
