"""``--compile``: a model's tensor work under ``torch.compile``, once per process.

What is compiled is :meth:`~moeca.models.dit_moe.DiTMoE.forward_core`; ``DiTMoE.forward`` stays eager
around it (input checks, the runtime's ``prepare_forward``/``finish_forward``), so a caching runtime
takes its host-side decisions -- which step, which rules -- outside the compiled code, and a sampling
run compiles one graph per *kind* of step (one set of rules and cache states: e.g. the first step, a
refresh step, a forecast step), never one per step number. Before compiling, every MoE layer's experts
are stacked (:func:`~moeca.models.dispatch.prepare_model`) and, on CUDA, the stacks are marked as static
addresses so CUDA graphs read them where they are. While compiling, the routed-expert dispatch and the
replay engine take their sync-free paths, so each kind of step is one graph (tests count the breaks and
the graphs without inductor). The first call of each kind compiles (about 90 s for the demo model on 2
CPU cores); time after a warm-up run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from .dispatch import prepare_model

RECOMPILE_LIMIT = 256
"""Graphs dynamo keeps per compiled function before it would run the rest eagerly (its default is 8)."""


@dataclass(frozen=True)
class CompileOptions:
    """How to compile. mode: ``torch.compile`` mode (None = default; ``"reduce-overhead"`` = CUDA graphs,
    one per distinct step kind and shape); backend: ``"inductor"`` (tests use ``"eager"``: tracing
    without code generation); dynamic: False = specialise on shapes (sampling repeats one shape)."""

    mode: str | None = None
    backend: str = "inductor"
    dynamic: bool = False

    @staticmethod
    def for_device(device: torch.device | str) -> "CompileOptions":
        """CUDA graphs on CUDA (launch-bound steps), the default mode elsewhere."""
        return CompileOptions(mode="reduce-overhead" if torch.device(device).type == "cuda" else None)


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "compiled_core", None) is not None


def compile_model(model: nn.Module, options: CompileOptions | None = None, in_place: bool = True) -> nn.Module:
    """Compile ``model``'s :meth:`forward_core` in place (a second call is a no-op) and return ``model``;
    with ``in_place=False`` return a compiled shallow copy (same parameters, modules and expert stacks;
    its own ``runtime`` slot: use ``copy.use_runtime``) and leave ``model`` eager, to time both in one
    process.

    options: default :meth:`CompileOptions.for_device` of the model's parameters.
    """
    if in_place and is_compiled(model):
        return model
    device = next(model.parameters()).device
    options = options or CompileOptions.for_device(device)
    prepare_model(model)
    if device.type == "cuda":
        for module in model.modules():
            stack = getattr(module, "expert_stack", None)
            if stack is not None:
                torch._dynamo.mark_static_address(stack.gate_up)
                torch._dynamo.mark_static_address(stack.down)
    # a compiled forward is specialised per replay runtime object and kind of step: a benchmark that replays
    # many schedules in one process must recompile, not fall back to eager at dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           8 * RECOMPILE_LIMIT)
    target = model if in_place else copy.copy(model)
    target.compiled_core = torch.compile(target.forward_core, mode=options.mode, backend=options.backend,
                                         dynamic=options.dynamic)
    return target
