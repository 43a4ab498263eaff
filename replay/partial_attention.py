"""Attention for a subset of query tokens (keys and values from all tokens).

Mechanism only: which tokens to recompute is policy (the replay runtime's rules). Supports the two
attention modules of :mod:`moeca.models.dit_moe` (timm-style ``qkv``/``proj`` and the XL/G
``Wqkv``/``q_norm``/``k_norm``/``out_proj``). Shapes: ``x [B, T, D]``, ``idx [B, n]`` (token indices
per sample) -> ``[B, n, D]``, the same rows full attention would give for those tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def partial_attention(attn: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Attention output for the query tokens ``idx [B, n]`` of ``x [B, T, D]`` -> ``[B, n, D]``.

    Cost: the K/V projections on all ``T`` tokens, the Q projection, SDPA and output projection on
    ``n`` tokens per sample.
    """
    B, T, D = x.shape
    n = idx.shape[1]
    H = attn.num_heads
    hd = D // H
    if hasattr(attn, "qkv"):
        w, b = attn.qkv.weight, attn.qkv.bias
        q_norm = k_norm = None
        out_proj = attn.proj
    elif hasattr(attn, "Wqkv"):
        w, b = attn.Wqkv.weight, attn.Wqkv.bias
        q_norm, k_norm = attn.q_norm, attn.k_norm
        out_proj = attn.out_proj
    else:
        raise TypeError(f"partial attention does not know the module {type(attn).__name__}; expected qkv/proj "
                        "or Wqkv/q_norm/k_norm/out_proj (write an adapter for this model)")
    x_q = torch.gather(x, 1, idx.unsqueeze(-1).expand(B, n, D))
    q = F.linear(x_q, w[:D], None if b is None else b[:D]).reshape(B, n, H, hd).transpose(1, 2)
    kv = F.linear(x, w[D:], None if b is None else b[D:]).reshape(B, T, 2, H, hd).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v)
    return out_proj(out.transpose(1, 2).reshape(B, n, D))
