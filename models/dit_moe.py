"""DiT-MoE (arXiv 2407.11633) in one file, state-dict compatible with the public checkpoints.

Sections follow the paper: embedders, attention, the sparse MoE layer, the adaLN-Zero block, the
final layer, the model. Every block calls the model's :class:`~moeca.models.runtime.Runtime` at two
seams (attention and MoE); the MoE seam is itself split into route / expert / shared expert / combine.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DiTMoEConfig
from .runtime import DEFAULT_RUNTIME, ForwardContext, Runtime


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x [B, T, D]``, ``shift/scale [B, D]``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PlainLayerNorm(nn.LayerNorm):
    """LayerNorm without a learned affine (a block's ``norm1``/``norm2``, the final layer's ``norm_final``;
    no state-dict keys). It runs PyTorch's affine kernel with weight 1 and bias 0 (non-persistent buffers):
    the same values bit for bit, about twice as fast on the CPU, where the kernel without weights takes a
    slower path (measured 2.1x at ``[32, 64, 96]``, 2.0-2.6x at ``[16, 256, 384]``, 2 threads)."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, elementwise_affine=False, eps=eps)
        self.register_buffer("unit_weight", torch.ones(dim), persistent=False)
        self.register_buffer("zero_bias", torch.zeros(dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.unit_weight, self.zero_bias, self.eps)


# ----------------------------------------------------------------------------- embedders
class PatchEmbed(nn.Module):
    """Image ``[B, C, H, W]`` -> tokens ``[B, T, D]`` (row-major patches): the strided convolution of the
    public models (key ``proj``, kernel = stride = patch size), computed as one GEMM over the flattened
    patches -- the same sums (bit for bit at patch size 1, to float rounding otherwise), 4-6x faster than
    the CPU convolution at the demo and S/2 shapes, and contiguous tokens."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(B, (H // p) * (W // p), C * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps ``[B]`` -> ``[B, D]`` via sinusoidal features and a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels ``[B]`` -> ``[B, D]``; row ``num_classes`` is the null class used for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """timm-style attention of S/B: ``qkv`` and ``proj`` with bias, SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class QKNormAttention(nn.Module):
    """XL/G attention: ``Wqkv``, per-head LayerNorm ``q_norm``/``k_norm``, ``out_proj`` (all with bias)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.Wqkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(head_dim, eps=eps)
        self.k_norm = nn.LayerNorm(head_dim, eps=eps)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.Wqkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


# ----------------------------------------------------------------------------- sparse MoE
class MoEGate(nn.Module):
    """Softmax router, top-k, raw (not renormalised) probabilities, no capacity limit."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def probabilities(self, h: torch.Tensor) -> torch.Tensor:
        """Rows ``[N, D]`` -> routing probabilities ``[N, E]`` (float32)."""
        logits = F.linear(h, self.weight).float()
        if logits.device.type == "cpu" and logits.dim() == 2:
            # the CPU kernel vectorises along the reduced dim, only E (8) wide: over the transpose it runs
            # ~4x faster (same values to 1 ulp; every runtime routes through this one function)
            return logits.t().softmax(dim=0).t()
        return logits.softmax(dim=-1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        topk_weight, topk_idx = torch.topk(self.probabilities(h), self.top_k, dim=-1, sorted=True)
        return topk_idx, topk_weight.to(h.dtype)


class SwiGLU(nn.Module):
    """Bias-free SwiGLU expert: ``down_proj(silu(gate_proj(h)) * up_proj(h))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class SparseMoE(nn.Module):
    """Routed SwiGLU experts plus one shared expert; the forward itself lives in the runtime."""

    def __init__(self, dim: int, num_experts: int, top_k: int, expert_hidden: int, shared_hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = MoEGate(dim, num_experts, top_k)
        self.experts = nn.ModuleList(SwiGLU(dim, expert_hidden) for _ in range(num_experts))
        self.shared_experts = SwiGLU(dim, shared_hidden) if shared_hidden > 0 else None
        self.expert_stack = None
        """:class:`~moeca.models.dispatch.ExpertStack` of the routed experts (their weights become views of it);
        built by the first inference dispatch, not part of the state dict."""


# ----------------------------------------------------------------------------- block
class DiTMoEBlock(nn.Module):
    """adaLN-Zero block: ``x += gate_msa * attn(mod(norm1 x))``; ``x += gate_mlp * moe(mod(norm2 x))``."""

    def __init__(self, config: DiTMoEConfig, index: int):
        super().__init__()
        D = config.hidden_size
        self.index = index
        self.norm1 = PlainLayerNorm(D, eps=1e-6)
        self.attn = (QKNormAttention(D, config.num_heads, config.qk_norm_eps) if config.qk_norm
                     else Attention(D, config.num_heads))
        self.norm2 = PlainLayerNorm(D, eps=1e-6)
        self.moe = SparseMoE(D, config.num_experts, config.top_k, config.expert_hidden, config.shared_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))

    def attention_input(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The modulated attention input ``modulate(norm1(x), shift_msa, scale_msa)`` -> ``[B, T, D]``
        (what :meth:`forward` passes to the attention seam; used as a cheap change indicator)."""
        shift_msa, scale_msa = self.adaLN_modulation(c).chunk(6, dim=1)[:2]
        return modulate(self.norm1(x), shift_msa, scale_msa)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rt: Runtime) -> torch.Tensor:
        """x ``[B, T, D]``, condition c ``[B, D]`` -> ``[B, T, D]``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * rt.attention(self, modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * rt.moe(self, modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = PlainLayerNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------- model
class DiTMoE(nn.Module):
    """Class-conditional DiT-MoE. ``forward(x [B,C,H,W], t [B], y [B] int64) -> [B, out_channels, H, W]``.

    ``t`` is in the units the model was trained with: DDPM timestep index (0..999) for ``ddpm_eps``
    models, continuous time in [0, 1] (1 = noise) for ``rectified_flow`` models.
    """

    def __init__(self, config: DiTMoEConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, D), requires_grad=False)
        self.blocks = nn.ModuleList(DiTMoEBlock(config, i) for i in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self.runtime: Runtime = DEFAULT_RUNTIME
        self.compiled_core = None
        """``torch.compile`` of :meth:`forward_core` when compiled (:func:`~moeca.models.compile.compile_model`)."""
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = int(self.config.num_tokens ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.config.hidden_size, grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    @contextlib.contextmanager
    def use_runtime(self, runtime: Runtime) -> Iterator[Runtime]:
        """Run forwards through ``runtime`` inside the ``with`` block, then restore the previous one."""
        previous, self.runtime = self.runtime, runtime
        try:
            yield runtime
        finally:
            self.runtime = previous

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, p*p*C]`` -> ``[B, C, H, W]``."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                ctx: ForwardContext | None = None) -> torch.Tensor:
        """Host-side work (input checks, the runtime's :meth:`~Runtime.prepare_forward` and
        :meth:`~Runtime.finish_forward`) around :meth:`forward_core`, the part ``--compile`` compiles."""
        self.check_inputs(x, t, y)
        rt = self.runtime
        rt.prepare_forward(self, ctx, x)
        core = self.compiled_core if self.compiled_core is not None else self.forward_core
        out = core(x, t, y, ctx)
        rt.finish_forward(self, ctx, out)
        return out

    def forward_core(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                     ctx: ForwardContext | None = None) -> torch.Tensor:
        """The forward's tensor work, free of host syncs on the device path (see :mod:`.compile`)."""
        rt = self.runtime
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        rt.begin_forward(self, ctx, tokens)
        tokens = rt.run_blocks(self, tokens, c)
        out = self.unpatchify(self.final_layer(tokens, c))
        rt.end_forward(self, ctx)
        return out

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"input x has shape {tuple(x.shape)}; model {cfg.name!r} expects [B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}]")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must have shape [{x.shape[0]}]; got t {tuple(t.shape)}, y {tuple(y.shape)}")
        # labels are read on the host only where that is free: a forward on a GPU never waits for the device
        # (samplers check a run's labels once, with check_labels, before moving them to the device)
        if y.device.type == "cpu" and not torch.compiler.is_compiling():
            self.check_labels(y)

    def check_labels(self, y: torch.Tensor) -> None:
        """Labels ``[B]`` must lie in ``0..num_classes`` (the last is the null class); one host read."""
        if not y.numel():
            return
        lo, hi = torch.stack(torch.aminmax(y)).tolist()
        if lo < 0 or hi > self.y_embedder.embedding_table.num_embeddings - 1:
            cfg = self.config
            raise ValueError(f"labels must lie in 0..{cfg.num_classes - 1} (or {cfg.num_classes} for the null "
                             f"class); got values in {lo}..{hi}")

    @property
    def null_class(self) -> int:
        return self.config.num_classes


# ----------------------------------------------------------------------------- positional embedding
def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos embedding (MAE layout) -> ``[grid_size**2, embed_dim]``."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _sincos_1d(embed_dim // 2, grid[0])
    emb_w = _sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
