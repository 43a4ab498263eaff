"""Analytic FLOPs of the units a schedule can skip (one multiply-add = 2 FLOPs).

Used by the derivation (predicted FLOPs ratio) and by replay (FLOPs actually computed, from the
counted rows). Elementwise work (norms, modulation, residual adds, softmax) is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnitCosts:
    """FLOPs per row of each unit of one block, and the fixed per-forward work outside the blocks.

    attn_q: one query token through the Q projection, SDPA over ``T`` keys and the output projection;
    attn_kv: one token through the K and V projections; expert: one (token, expert) pair through a
    routed SwiGLU expert; shared: one token through the shared expert; router: one token through the
    gate; per_sample: adaLN of every block, the final layer's adaLN and the timestep MLP, per sample;
    per_token_fixed: patch embedding and final linear per token.
    """

    attn_q: float
    attn_kv: float
    expert: float
    shared: float
    router: float
    per_sample: float
    per_token_fixed: float
    num_tokens: int
    top_k: int
    depth: int

    @classmethod
    def of(cls, config) -> "UnitCosts":
        from moeca.analysis.flops import block_unit_flops
        D = config.hidden_size
        patch = config.patch_size ** 2
        unit = block_unit_flops(D, config.expert_hidden, config.shared_hidden, config.num_tokens, config.num_experts)
        return cls(
            attn_q=unit["attn_q"], attn_kv=unit["attn_kv"], expert=unit["expert"], shared=unit["shared"],
            router=unit["router"],
            per_sample=2 * (config.depth * 6 * D * D + 2 * D * D + 256 * D + D * D),
            per_token_fixed=2 * (patch * config.in_channels * D + D * patch * config.out_channels),
            num_tokens=config.num_tokens, top_k=config.top_k, depth=config.depth,
        )

    @property
    def attn(self) -> float:
        """Full attention per token."""
        return self.attn_q + self.attn_kv

    def block_per_token(self) -> float:
        """One block per token at full compute (attention, router, k experts, shared)."""
        return self.attn + self.router + self.top_k * self.expert + self.shared

    def fixed_per_sample(self) -> float:
        """Work outside the blocks per sample and forward."""
        return self.per_sample + self.num_tokens * self.per_token_fixed

    def full_forward(self, batch: int) -> float:
        """FLOPs of one full forward on ``batch`` samples (rows; batched CFG counts both halves)."""
        return batch * (self.fixed_per_sample() + self.depth * self.num_tokens * self.block_per_token())
