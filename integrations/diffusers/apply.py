"""``apply_schedule(transformer, schedule)``: MoECa on a diffusers HiDream transformer, the way diffusers
users apply a cache; ``handle.remove()`` gives the stock model back.

    from moeca.integrations.diffusers import apply_schedule
    handle = apply_schedule(pipe.transformer, "schedule.json")
    image = pipe(prompt, num_inference_steps=50).images[0]     # steps counted per call
    print(handle.stats())                                       # FLOPs run vs full compute
    handle.remove()
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from moeca.diffusion.samplers import SamplerConfig
from moeca.models.config import DiTMoEConfig
from moeca.models.dispatch import PATHS, expert_stack, unstack_experts
from moeca.policy.schedule import Schedule, ScheduleMismatch, full_schedule

from .engine import FOLD_GATE_TOLERANCE, Counters, ScheduleEngine
from .hidream import HiDreamBlock, architecture, identity_name, moe_blocks, view_config, weights_hash
from .hooks import TransformerHook, attach, detach

HOOK_NAME = "moeca_schedule"


def check_identity(schedule: Schedule, transformer: torch.nn.Module, blocks: tuple[HiDreamBlock, ...],
                   check_weights: bool = True) -> None:
    """Refuse a schedule derived for another model: the diffusers class and config (the identity name),
    the MoE shape, and the weights hash (when ``check_weights`` and the schedule records one)."""
    m, arch = schedule.model, architecture(transformer, blocks)
    name = identity_name(transformer)
    if m.name != name:
        raise ScheduleMismatch(f"schedule field model.name: the schedule was derived for {m.name!r} but the transformer "
                               f"is {name!r} (diffusers class @ config hash); derive a schedule from a trace of this "
                               "model with `moeca trace --diffusers` and `moeca schedule derive`")
    for field, ours in (("depth", arch.depth), ("num_experts", arch.num_experts), ("top_k", arch.top_k),
                        ("hidden_size", arch.dim), ("expert_hidden", arch.expert_hidden),
                        ("shared_hidden", arch.shared_hidden)):
        if getattr(m, field) != ours:
            raise ScheduleMismatch(f"schedule field model.{field}: the schedule has {getattr(m, field)}, the "
                                   f"transformer {ours}")
    if check_weights and m.weights_hash is not None:
        ours = weights_hash(transformer)
        if ours != m.weights_hash:
            raise ScheduleMismatch(f"schedule field model.weights_hash: the schedule was derived for weights "
                                   f"{m.weights_hash} but these weights hash to {ours}; derive a schedule from a "
                                   "trace of these weights (or pass check_weights=False)")


@dataclass
class MoECaHandle:
    """What :func:`apply_schedule` attached. ``remove()`` detaches every hook and gives the experts their
    own weight storage back (the stock forward, bit for bit); ``reset()`` forgets every cache;
    ``context(name, ...)`` runs calls in a named diffusers ``CacheContext`` (HiDream's transformer has no
    ``cache_context`` of its own); ``stats()`` the FLOPs run so far."""

    transformer: torch.nn.Module
    schedule: Schedule
    engine: ScheduleEngine
    blocks: tuple[HiDreamBlock, ...]
    hook: TransformerHook
    name: str = HOOK_NAME
    removed: bool = False

    def remove(self) -> None:
        if self.removed:
            return
        detach(self.transformer, self.name)
        for block in self.blocks:
            unstack_experts(block.moe)
        self.removed = True

    def reset(self) -> None:
        self.hook.reset_state(self.transformer)

    @contextlib.contextmanager
    def context(self, name: str, **fields) -> Iterator[None]:
        """``with handle.context("cond", step_index=i):`` -- state and step of the named CFG context."""
        # deferred: the optional [diffusers] extra
        from diffusers.hooks.hooks import CacheContext
        self.hook.state_manager.set_context(CacheContext(name, **fields))
        try:
            yield
        finally:
            self.hook.state_manager.set_context(None)

    @property
    def counters(self) -> Counters:
        return self.engine.counters

    def stats(self) -> dict:
        """``flops_ratio`` (full-compute FLOPs over FLOPs run), ``pairs_computed``, ``pairs_routed``,
        ``forwards`` (``stack_forwards`` of them one sum over the stack, ``folded_forwards`` folded),
        ``gate_error`` (the largest relative error of the gates' linear interpolation the fold's check measured),
        ``cache_bytes`` of every context."""
        c = self.engine.counters
        states = self.hook.state_manager._state_cache.values()
        return {"flops_ratio": c.flops_ratio, "pairs_computed": c.pairs, "pairs_routed": c.routed_pairs,
                "forwards": c.forwards, "stack_forwards": c.stack_forwards, "folded_forwards": c.folded_forwards,
                "gate_error": c.gate_error,
                "cache_bytes": sum(s.nbytes for s in states)}


def apply_schedule(transformer: torch.nn.Module, schedule: "Schedule | str | os.PathLike", *,
                   dispatch: str = "auto", check_weights: bool = True, fold: bool = True,
                   stack: bool = True, record: bool = False,
                   fold_tolerance: float = FOLD_GATE_TOLERANCE) -> MoECaHandle:
    """Attach moeca to a diffusers HiDream transformer so its forwards follow ``schedule`` (a
    :class:`~moeca.policy.schedule.Schedule` or a schedule file).

    The schedule must have been derived for this transformer (class, config, weights: see
    :func:`check_identity`). ``dispatch``: the routed-expert path (``"auto"`` = the fastest for the
    device; ``"loop"``/``"grouped"`` to compare). ``fold``: token-level forecast steps sum the folded
    products (:mod:`moeca.replay.units.stack`, the native engine's default) while the gates move linearly
    enough between refreshes (``fold_tolerance``: the largest relative error of their linear interpolation
    at the forecast steps between two refreshes, :data:`~.engine.FOLD_GATE_TOLERANCE`; ``math.inf``: fold
    whatever the gates do); False: the exact gates, unit by unit. ``stack``: a step that forecasts every unit runs as one sum over the stack, no block running (False:
    every block runs and its hooks forecast each unit). ``record``: keep what each forward executed in
    ``handle.counters.work`` (the wall-clock calibration). Returns a :class:`MoECaHandle`.
    """
    if dispatch not in PATHS:
        raise ValueError(f"dispatch {dispatch!r} is not one of {', '.join(PATHS)}")
    if not isinstance(schedule, Schedule):
        schedule = Schedule.load(schedule)
    blocks = moe_blocks(transformer)
    check_identity(schedule, transformer, blocks, check_weights)
    engine = ScheduleEngine(schedule, architecture(transformer, blocks), dispatch, blocks=blocks, fold=fold,
                            stack=stack, record=record, fold_tolerance=fold_tolerance)
    hook = attach(transformer, blocks, engine, HOOK_NAME, attention=True)
    for block in blocks:       # stack the routed experts now (their weights become views), not in the first forward
        expert_stack(block.moe)
    return MoECaHandle(transformer, schedule, engine, blocks, hook)


def none_schedule(transformer: torch.nn.Module, num_steps: int, *, max_tokens: int, cfg_scale: float = 5.0,
                  weights: str | None = None) -> Schedule:
    """The schedule that reuses nothing (method ``none``) for ``transformer``: the full-compute reference
    and the check that moeca's full compute equals the stock forward."""
    config: DiTMoEConfig = view_config(transformer, max_tokens)
    sampler = SamplerConfig(kind="rectified_flow", num_steps=num_steps, cfg_scale=cfg_scale, cfg_mode="batched")
    return full_schedule(config, sampler, weights, method="none")
