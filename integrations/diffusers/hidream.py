"""HiDream-I1's transformer as a moeca model family (DESIGN section 1b): its MoE blocks, identity and FLOPs.

``HiDreamImageTransformer2DModel`` (diffusers) has ``num_layers`` double-stream blocks (image and text
streams, joint attention ``attn1``, the MoE ``ff_i`` on image tokens, the dense ``ff_t`` on text tokens)
and ``num_single_layers`` single-stream blocks (``attn1`` and the MoE ``ff_i`` over image + text tokens).
Each ``ff_i`` is a ``MOEFeedForwardSwiGLU``: ``gate`` (softmax top-k, not renormalised, unsorted),
routed ``experts.{e}`` and ``shared_experts``, SwiGLU ``w2(silu(w1 h) * w3 h)``. moeca numbers the MoE
blocks double first, then single (``index`` 0..L-1): the ``block`` of traces and schedules.

Nothing here edits or subclasses a diffusers class: the adapters below only hold references to the
model's modules.

Shapes: ``B`` batch rows, ``T`` tokens of a block's MoE, ``N = B*T``, ``D`` hidden size, ``k`` slots.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from moeca.models.config import DiTMoEConfig
from moeca.models.dispatch import run_routed

from .compat import check_transformer

WEIGHT_SAMPLES = 65536
"""Values per tensor the weights hash reads (evenly spaced), so hashing 17B parameters takes seconds."""


class HiDreamMoE:
    """A HiDream ``MOEFeedForwardSwiGLU`` seen as moeca's MoE layer (:class:`~moeca.models.protocol.MoELayer`).

    ``gate(h [N, D]) -> (topk_idx [N, k] int64, topk_weight [N, k])``: the module's own ``MoEGate`` (its
    auxiliary loss, None in eval, is dropped). ``expert_stack`` is the dispatch's stacked weights.
    """

    def __init__(self, ff: nn.Module):
        self.ff = ff
        self.experts: nn.ModuleList = ff.experts
        self.shared_experts: nn.Module | None = ff.shared_experts
        self.num_experts = len(ff.experts)
        self.top_k = int(ff.num_activated_experts)
        self.expert_stack = None

    def gate(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        topk_idx, topk_weight, _ = self.ff.gate(h.unsqueeze(0))
        return topk_idx, topk_weight


@dataclass(frozen=True)
class HiDreamBlock:
    """One MoE block (:class:`~moeca.models.protocol.MoEBlock`): ``index`` among the MoE blocks, ``kind``
    (``"double"`` or ``"single"`` stream), the diffusers block ``module``, its ``attn`` (``attn1``), its
    ``ff`` (the ``ff_i`` module), ``moe`` (the adapter) and ``dense`` (``ff_t``, double-stream only)."""

    index: int
    kind: str
    module: nn.Module
    attn: nn.Module
    ff: nn.Module
    moe: HiDreamMoE
    dense: nn.Module | None


@dataclass(frozen=True)
class Architecture:
    """What FLOPs and the schedule identity need: hidden ``dim``, ``heads``, expert hidden ``expert_hidden``,
    shared expert hidden ``shared_hidden``, text feed-forward hidden ``dense_hidden``, ``num_experts``,
    ``top_k``, ``num_double`` and ``num_single`` blocks."""

    dim: int
    heads: int
    expert_hidden: int
    shared_hidden: int
    dense_hidden: int
    num_experts: int
    top_k: int
    num_double: int
    num_single: int

    @property
    def depth(self) -> int:
        return self.num_double + self.num_single


def moe_blocks(transformer: nn.Module) -> tuple[HiDreamBlock, ...]:
    """The MoE blocks of a HiDream transformer, double-stream first; a clear error without any MoE."""
    check_transformer(transformer)
    blocks: list[HiDreamBlock] = []
    for kind, wrappers in (("double", transformer.double_stream_blocks), ("single", transformer.single_stream_blocks)):
        for wrapper in wrappers:
            block = getattr(wrapper, "block", wrapper)
            ff = block.ff_i
            if not (hasattr(ff, "gate") and hasattr(ff, "experts")):
                raise ValueError(f"{type(transformer).__name__} has a dense feed-forward ({type(ff).__name__}) in "
                                 f"its {kind}-stream block {len(blocks)}: moeca caches routed experts, so it needs "
                                 "num_routed_experts > 0 (HiDream-I1's configs have 4)")
            blocks.append(HiDreamBlock(len(blocks), kind, block, block.attn1, ff, HiDreamMoE(ff),
                                       getattr(block, "ff_t", None)))
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer blocks (num_layers = num_single_layers = 0)")
    return tuple(blocks)


def architecture(transformer: nn.Module, blocks: tuple[HiDreamBlock, ...] | None = None) -> Architecture:
    blocks = blocks or moe_blocks(transformer)
    ff = blocks[0].ff
    dense = next((b.dense for b in blocks if b.dense is not None), None)
    return Architecture(dim=int(transformer.inner_dim), heads=int(transformer.config.num_attention_heads),
                        expert_hidden=int(ff.experts[0].w1.weight.shape[0]),
                        shared_hidden=int(ff.shared_experts.w1.weight.shape[0]),
                        dense_hidden=int(dense.w1.weight.shape[0]) if dense is not None else 0,
                        num_experts=len(ff.experts), top_k=int(ff.num_activated_experts),
                        num_double=sum(b.kind == "double" for b in blocks),
                        num_single=sum(b.kind == "single" for b in blocks))


def config_hash(transformer: nn.Module) -> str:
    """16 hex digits of SHA-256 over the transformer's diffusers config (its ``config.json`` values)."""
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode()).hexdigest()[:16]


def identity_name(transformer: nn.Module) -> str:
    """The model name a trace and a schedule carry: ``diffusers.<class>@<config hash>``."""
    return f"diffusers.{type(transformer).__name__}@{config_hash(transformer)}"


def weights_hash(transformer: nn.Module) -> str:
    """16 hex digits of SHA-256 over every tensor's name, shape, dtype and :data:`WEIGHT_SAMPLES` evenly
    spaced values (float32): a stand-in for the full hash that reads kilobytes per tensor, not gigabytes."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(transformer.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // WEIGHT_SAMPLES)
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            h.update(flat[::step][:WEIGHT_SAMPLES].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def view_config(transformer: nn.Module, max_tokens: int, arch: Architecture | None = None) -> DiTMoEConfig:
    """The model as moeca's analysis and derivation see it: a ``DiTMoEConfig`` with the same MoE blocks
    (depth = double + single blocks, hidden size, experts, top-k, expert and shared hidden sizes) and at
    least ``max_tokens`` tokens (a square, patch 1), rectified-flow objective, named by
    :func:`identity_name`. Attention FLOPs of the view approximate HiDream's joint attention."""
    arch = arch or architecture(transformer)
    side = math.isqrt(max_tokens - 1) + 1 if max_tokens > 1 else 1
    D = arch.dim
    return DiTMoEConfig(name=identity_name(transformer), input_size=side, patch_size=1,
                        in_channels=int(transformer.config.in_channels), hidden_size=D, depth=arch.depth,
                        num_heads=arch.heads, mlp_ratio=_ratio(arch.expert_hidden, D), num_experts=arch.num_experts,
                        top_k=arch.top_k, shared_expert_ratio=_ratio(arch.shared_hidden, D), num_classes=1,
                        class_dropout_prob=0.0, learn_sigma=False, objective="rectified_flow")


def _ratio(hidden: int, dim: int) -> float:
    """A float ``r`` with ``int(dim * r) == hidden`` (``DiTMoEConfig`` stores hidden sizes as ratios)."""
    r = hidden / dim
    while int(dim * r) < hidden:
        r = math.nextafter(r, math.inf)
    return r


# ----------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class UnitFlops:
    """FLOPs (multiply-adds x 2) of one unit: ``attn`` per batch row of a block (projections of every
    token of the joint sequence plus scores and values), ``expert`` per (token, expert) pair, ``shared``
    per MoE token, ``dense`` per text token of a double-stream block, ``router`` per MoE token."""

    attn: float
    expert: float
    shared: float
    dense: float
    router: float

    @classmethod
    def of(cls, arch: Architecture, joint_tokens: int) -> "UnitFlops":
        D, J = arch.dim, joint_tokens
        return cls(attn=8.0 * D * D * J + 4.0 * J * J * D, expert=6.0 * D * arch.expert_hidden,
                   shared=6.0 * D * arch.shared_hidden, dense=6.0 * D * arch.dense_hidden,
                   router=2.0 * D * arch.num_experts)


# ----------------------------------------------------------------------------- full compute
def combine_in_expert_order(slot_out: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of the unweighted outputs ``slot_out [N, k, D]`` -> ``[N, D]`` in the stock
    ``moe_infer``'s order and dtype: each output times its weight, rounded to the output dtype, then
    summed in increasing expert id (the stock loop adds expert by expert into zeros), so the result is
    the stock one bit for bit. With two slots the order does not matter (addition commutes), so no gather."""
    weighted = (slot_out * topk_weight.unsqueeze(-1)).to(slot_out.dtype)
    k = topk_idx.shape[1]
    if k == 1:
        return weighted[:, 0]
    if k == 2:      # (0 + a) + b == a + b == b + a in floating point: no reordering needed (HiDream's top-2)
        return weighted[:, 0] + weighted[:, 1]
    order = topk_idx.argsort(dim=1)
    weighted = weighted.gather(1, order.unsqueeze(-1).expand(-1, -1, weighted.shape[2]))
    out = weighted[:, 0]
    for j in range(1, k):
        out = out + weighted[:, j]
    return out


@dataclass
class MoEResult:
    """A computed MoE block: ``out [B, T, D]`` (routed + shared, what ``ff_i`` returns), ``routed [N, D]``,
    ``shared [B, T, D]``, ``ids``/``weights [N, k]``, unweighted ``slot_out [N, k, D]``."""

    out: torch.Tensor
    routed: torch.Tensor
    shared: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    slot_out: torch.Tensor


def moe_full(block: HiDreamBlock, x: torch.Tensor, path: str = "auto") -> MoEResult:
    """Every unit of ``ff_i`` on ``x [B, T, D]`` with moeca's dispatch (the routed experts in one stacked
    dispatch for the device instead of the stock Python loop with a host sync), equal to the stock
    ``ff_i(x)``."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)
    ids, weights = block.moe.gate(flat)
    slot_out = run_routed(block.moe, flat, ids, path=path)
    routed = combine_in_expert_order(slot_out, ids, weights)
    shared = block.moe.shared_experts(x)
    return MoEResult(routed.view(B, T, D) + shared, routed, shared, ids, weights, slot_out)
