"""Analytic FLOPs of the units a cache can reuse, from a model configuration.

Convention: one multiply-add counts as 2 FLOPs. Per block:

- routed expert, per (token, expert) pair: SwiGLU ``down(silu(gate(h)) * up(h))`` = 3 matmuls
  ``D x H_e`` -> ``2 * 3 * D * H_e`` with ``H_e = mlp_ratio * D``;
- shared expert, per token: ``2 * 3 * D * H_s`` with ``H_s = shared_expert_ratio * D`` (0 if absent);
- attention, per token: qkv + output projection ``2 * 4 * D^2`` plus scores and weighted values
  ``2 * 2 * T * D``;
- router, per token: ``2 * D * E``;
- adaLN modulation, per sample (not per token): ``2 * D * 6 * D``.

Element-wise work (norms, softmax, SiLU, residual adds) is left out; it is small and not reusable.
"""
from __future__ import annotations

from typing import Any, Mapping


def _get(config: Any, name: str) -> Any:
    if isinstance(config, Mapping):
        if name not in config:
            raise ValueError(f"model config is missing {name!r}; expected DiTMoEConfig.to_dict() fields")
        return config[name]
    return getattr(config, name)


def block_unit_flops(hidden: int, expert_hidden: int, shared_hidden: int, tokens: int, num_experts: int
                     ) -> dict[str, float]:
    """The per-unit FLOPs of one block from its shapes (the module docstring's formulas): ``expert`` (per
    (token, expert) pair), ``shared``, ``router`` and ``attn`` per token, with ``attn`` split into
    ``attn_q`` (Q and output projections plus scores and weighted values, per query token) and
    ``attn_kv`` (K and V projections, per key token)."""
    d = float(hidden)
    attn_q = 2.0 * 2 * d * d + 2.0 * 2 * tokens * d
    attn_kv = 2.0 * 2 * d * d
    return {"expert": 2.0 * 3 * d * expert_hidden, "shared": 2.0 * 3 * d * shared_hidden,
            "router": 2.0 * d * num_experts, "attn": attn_q + attn_kv, "attn_q": attn_q, "attn_kv": attn_kv}


def unit_flops(config: Mapping | Any) -> dict[str, float]:
    """FLOPs per unit for a DiT-MoE configuration (a ``DiTMoEConfig`` or its ``to_dict()``).

    Returns ``expert`` (per routed (token, expert) pair), ``shared`` (per token), ``attn`` (per token),
    ``router`` (per token), ``moe_total_per_token`` (``top_k * expert + shared``), ``block_per_token``
    (attention + router + MoE, per token), ``adaln_per_sample`` (per block and sample), and the shape
    numbers used: ``hidden``, ``expert_hidden``, ``shared_hidden``, ``tokens``, ``num_experts``,
    ``top_k``, ``depth``. All per block, in FLOPs (float).
    """
    d = int(_get(config, "hidden_size"))
    h_e = int(d * float(_get(config, "mlp_ratio")))
    h_s = int(d * float(_get(config, "shared_expert_ratio")))
    tokens = (int(_get(config, "input_size")) // int(_get(config, "patch_size"))) ** 2
    e = int(_get(config, "num_experts"))
    k = int(_get(config, "top_k"))
    unit = block_unit_flops(d, h_e, h_s, tokens, e)
    expert, shared, attn, router = unit["expert"], unit["shared"], unit["attn"], unit["router"]
    moe_total = k * expert + shared
    return {"expert": expert, "shared": shared, "attn": attn, "router": router,
            "moe_total_per_token": moe_total, "block_per_token": attn + router + moe_total,
            "adaln_per_sample": 2.0 * d * 6 * d, "hidden": d, "expert_hidden": h_e, "shared_hidden": h_s,
            "tokens": tokens, "num_experts": e, "top_k": k, "depth": int(_get(config, "depth"))}
