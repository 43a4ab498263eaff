"""diffusers hooks that route HiDream's units to a moeca engine (the mechanism; the engine holds the policy).

Attached with diffusers' own ``HookRegistry`` (never by editing, subclassing or monkeypatching a
diffusers class) and removed by name:

- :class:`TransformerHook` on the transformer: stateful, one :class:`~.engine.ContextCaches` per
  diffusers ``CacheContext`` (``StateManager``), with a default context when the caller sets none (the
  HiDream pipeline sets none); before each forward it tells the engine the context, the step (the
  context's ``step_index`` when given, else counted and reset per sampling call) and the timestep;
- :class:`MoEHook` on each ``ff_i``, :class:`AttentionHook` on each ``attn1`` and :class:`DenseHook` on
  each ``ff_t``: ``new_forward`` hands the call to the engine, which computes (through the module's
  original forward, or moeca's dispatch for the routed experts) or reuses.

- :class:`StackInputHook` after ``x_embedder`` and :class:`StackOutputHook` before ``final_layer``: the
  stack's input and output (the fold of token-level forecast steps needs what the blocks added).

The engine protocol (``begin``/``end``/``forward``/``stack_input``/``stack_output``/``moe``/``attention``/``dense``, and ``block`` with block hooks) is met by the replay engine
(:class:`~.engine.ScheduleEngine`) and by the tracer (:class:`~.trace.TraceEngine`).
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch

from .compat import require_diffusers
from .hidream import HiDreamBlock

require_diffusers()
from diffusers.hooks.hooks import CacheContext, HookRegistry, ModelHook, StateManager  # noqa: E402  (the extra, checked)

from .engine import ContextCaches  # noqa: E402

DEFAULT_CONTEXT = "moeca_default"
"""The ``CacheContext`` name used when the caller sets none (the HiDream pipeline batches CFG in one call)."""


class Engine(Protocol):
    def begin(self, cs: ContextCaches, step: int | None, num_steps: int | None, batch: int,
              timestep: float | None) -> None: ...

    def end(self) -> None: ...

    def moe(self, block: HiDreamBlock, x: torch.Tensor) -> torch.Tensor: ...

    def attention(self, block: HiDreamBlock, inputs: tuple[torch.Tensor, ...], compute) -> Any: ...

    def dense(self, block: HiDreamBlock, x: torch.Tensor, compute) -> torch.Tensor: ...

    def forward(self, module: torch.nn.Module, call: dict, compute) -> Any: ...

    def stack_input(self, x: torch.Tensor) -> None: ...

    def stack_output(self, x: torch.Tensor) -> None: ...


def _timestep(value: Any) -> float | None:
    """The forward's timestep as a number (one host read of the first element), None when absent."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0]) if value.numel() else None
    return float(value)


class TransformerHook(ModelHook):
    """Per-context state and step bookkeeping around each transformer forward; ``new_forward`` hands the
    forward to the engine (which runs the stock one, or on a token-level forecast step one sum over the
    stack)."""

    _is_stateful = True

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self.state_manager = StateManager(ContextCaches)
        self._own_context = False
        self._params: list[str] = []

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        # the forward's parameter names (after self), to read its arguments by name
        self._params = list(inspect.signature(type(module).forward).parameters)[1:]
        return module

    def _call(self, args: tuple, kwargs: dict) -> dict:
        return {**dict(zip(self._params, args)), **kwargs}

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        sm = self.state_manager
        self._own_context = sm._context is None
        if self._own_context:
            sm.set_context(CacheContext(DEFAULT_CONTEXT))
        ctx = sm.context
        call = self._call(args, kwargs)
        x, t = call["hidden_states"], call.get("timesteps")
        # the timestep (one host read) tells a new sampling call only where the caller gives no step index
        t = _timestep(t) if ctx.step_index is None else None
        self.engine.begin(sm.get_state(), ctx.step_index, ctx.num_inference_steps, int(x.shape[0]), t)
        return args, kwargs

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.engine.forward(module, self._call(args, kwargs), lambda: self.fn_ref.original_forward(*args, **kwargs))

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.engine.end()
        if self._own_context:
            self.state_manager.set_context(None)
            self._own_context = False
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class MoEHook(ModelHook):
    """``ff_i(x)`` -> ``engine.moe(block, x)``."""

    def __init__(self, engine: Engine, block: HiDreamBlock):
        super().__init__()
        self.engine, self.block = engine, block

    def new_forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if module.training:
            return self.fn_ref.original_forward(x)
        return self.engine.moe(self.block, x)


class AttentionHook(ModelHook):
    """``attn1(...)`` -> ``engine.attention(block, token inputs, original call)``."""

    def __init__(self, engine: Engine, block: HiDreamBlock):
        super().__init__()
        self.engine, self.block = engine, block

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        inputs = tuple(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() == 3)
        return self.engine.attention(self.block, inputs, lambda: self.fn_ref.original_forward(*args, **kwargs))


class BlockHook(ModelHook):
    """A block's forward -> ``engine.block(block, its hidden_states input, original call)`` (the tracer
    records the block's update there)."""

    def __init__(self, engine: Engine, block: HiDreamBlock):
        super().__init__()
        self.engine, self.block = engine, block

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return self.engine.block(self.block, x_in, lambda: self.fn_ref.original_forward(*args, **kwargs))


class StackInputHook(ModelHook):
    """After ``x_embedder``: its output (the stack's input) -> ``engine.stack_input``."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        self.engine.stack_input(output)
        return output


class StackOutputHook(ModelHook):
    """Before ``final_layer``: its input (the stack's output, image tokens) -> ``engine.stack_output``."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.engine.stack_output(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        return args, kwargs


class DenseHook(ModelHook):
    """``ff_t(x)`` -> ``engine.dense(block, x, original call)``."""

    def __init__(self, engine: Engine, block: HiDreamBlock):
        super().__init__()
        self.engine, self.block = engine, block

    def new_forward(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.engine.dense(self.block, x, lambda: self.fn_ref.original_forward(x))


def attach(transformer: torch.nn.Module, blocks: tuple[HiDreamBlock, ...], engine: Engine, name: str,
           attention: bool = True, block_level: bool = False) -> TransformerHook:
    """Register the hooks under ``name`` (refused when hooks of that name are attached already);
    ``block_level`` adds a :class:`BlockHook` per block (the engine then needs ``block``)."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(name) is not None:
        raise ValueError(f"moeca hooks named {name!r} are attached to this transformer already; call remove() on "
                         "the handle that attached them first")
    top = TransformerHook(engine)
    registry.register_hook(top, name)
    HookRegistry.check_if_exists_or_initialize(transformer.x_embedder).register_hook(StackInputHook(engine), name)
    HookRegistry.check_if_exists_or_initialize(transformer.final_layer).register_hook(StackOutputHook(engine), name)
    for block in blocks:
        if block_level:
            HookRegistry.check_if_exists_or_initialize(block.module).register_hook(BlockHook(engine, block), name)
        HookRegistry.check_if_exists_or_initialize(block.ff).register_hook(MoEHook(engine, block), name)
        if attention:
            HookRegistry.check_if_exists_or_initialize(block.attn).register_hook(AttentionHook(engine, block), name)
            if block.dense is not None:
                HookRegistry.check_if_exists_or_initialize(block.dense).register_hook(DenseHook(engine, block), name)
    registry.invalidate_child_registries_cache()
    return top


def detach(transformer: torch.nn.Module, name: str) -> None:
    """Remove every hook named ``name`` from the transformer and its modules."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
