"""``--compile``: a model's forward under ``torch.compile``, once per process.

The model is compiled in place (``nn.Module.compile``), so samplers and runtimes call it as before.
Before compiling, every MoE layer's experts are stacked (:func:`~moeca.models.dispatch.prepare_model`)
and, on CUDA, the stacks are marked as static addresses so CUDA graphs read them where they are
instead of copying them in at every replay. While compiling, the routed-expert dispatch takes its
sync-free path, so a full-compute forward is one graph (tests count the breaks without inductor).
The first call of each shape compiles (about 90 s for the demo model on 2 CPU cores); time after a
warm-up run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .dispatch import prepare_model


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
    return getattr(model, "_compiled_call_impl", None) is not None


def compile_model(model: nn.Module, options: CompileOptions | None = None, in_place: bool = True) -> nn.Module:
    """Compile ``model``'s forward in place (a second call is a no-op) and return it; with ``in_place=False``
    return a compiled wrapper (``torch.compile(model)``, sharing the parameters) and leave ``model`` eager,
    to time both in one process.

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
    if not in_place:
        return torch.compile(model, mode=options.mode, backend=options.backend, dynamic=options.dynamic)
    model.compile(mode=options.mode, backend=options.backend, dynamic=options.dynamic)
    return model
